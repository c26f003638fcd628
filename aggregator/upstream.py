"""A site's link to its root federation: the root's models in, one partial result out.

An edge aggregator (``fedmq aggregator start --upstream SITE.toml``) runs the
ordinary engine (``service.py``) for the devices of its own broker. This object
is the engine's one seam to the root, whose broker the site's broker is bridged
to (``broker/mosquitto_conf.py``); it talks only to the site's own broker, as the
site's aggregator account, on the root's topics the bridge carries:

- in: ``fedmq/<root>/model``. Each root model is decoded and its signature
  checked with the root aggregator's key (the bundle's ``model_key``); the
  engine opens the site's round under the root's round number, announces the
  root's weights to its devices signed by the site's own key, and collects
  their updates as usual (FedAvg only: ``check_site_task``).
- out: ``fedmq/<root>/updates/<site>``. The round's FedAvg result goes up as ONE
  update of the site's device account at the root: the site's mean weights,
  ``num_samples`` the sum of its devices' samples, ``partial`` metadata (how many
  devices), bound to the root's run and model hash and signed with the site's key.
  The root weights it by ``num_samples`` like any update, so the root's FedAvg of
  site means weighted by site totals is the flat FedAvg of every device.
  ``status/<site>`` says the site is online (its last will: offline), so the
  root waits for the site's partial as it waits for a present device.

A partial is written to ``<run_dir>/partials/`` before it is published: a site
restarted before the root closed that round sends those bytes again (a copy the
root already has is not news to it, and a second update of the site in the same
round is a duplicate, counted once). The root's final model ends the site's run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import paho.mqtt.client as mqtt
import torch

from aggregator.durable import atomic_write
from broker import codec, messages, signals, signing
from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import CodecError, ConfigError, FedmqError
from broker.home import load_credentials
from broker.limits import DEFAULT_MAX_PAYLOAD
from broker.task import TaskSpec
from broker.topics import Topics

log = logging.getLogger("fedmq.upstream")

SITE_STRATEGIES = ("fedavg",)


def check_site_task(task: TaskSpec, *, secure_at_site: bool = False) -> None:
    """ConfigError unless a site can fold this task's updates into one partial result.

    A site's partial is its devices' sample-weighted mean with their summed weight, which
    the root's FedAvg turns into exactly the flat result. Strategies that are not such a
    sum (robust ones, fedbuff), per-device clipping and noise and compression (the root
    expects an update encoded as the task says) would silently change the result, so they
    are refused. Secure aggregation run by the root is refused (its devices would be the
    sites); a site's own secure sum among its devices (``site_task``) is what
    ``secure_at_site`` allows in the site's task."""
    strategy = dict(task.strategy)
    name = strategy.pop("name", "fedavg")
    problems = []
    if name not in SITE_STRATEGIES or strategy:
        shown = ", ".join(f"{k} = {v!r}" for k, v in {"name": name, **strategy}.items())
        problems.append(f"[strategy] must be plain fedavg at a site (the root's task has {shown})")
    for table in ("privacy", "compression"):
        if getattr(task, table):
            problems.append(f"[{table}] is not supported at a site yet")
    if task.secure_aggregation and not secure_at_site:
        problems.append(
            "[secure_aggregation] of the root is not supported with sites: run the secure "
            "sums at the sites instead (`fedmq aggregator start --upstream ... --secure-sum`)"
        )
    if problems:
        raise ConfigError("the root's task cannot run through a site: " + "; ".join(problems))


def site_task(root_task: TaskSpec, secure: Mapping | None = None) -> TaskSpec:
    """The task a site announces to its devices: the root's, plus the site's own
    ``[secure_aggregation]`` table when its devices' sum is to be secure (SecAgg+ among
    the site's devices: the edge aggregator learns only the site's sum)."""
    check_site_task(root_task)
    if not secure:
        return root_task
    return dataclasses.replace(root_task, secure_aggregation=dict(secure))


def partial_update(
    weights: Mapping[str, torch.Tensor],
    *,
    root: messages.ModelMessage,
    site: str,
    samples: int,
    devices: int,
    metrics: Mapping[str, float],
    site_federation: str,
    sign_key=None,
) -> bytes:
    """The root update that carries a site's round. Pure: the same result gives the same
    content and signature (Ed25519 is deterministic)."""
    meta = messages.update_metadata(
        round_=root.round,
        device_id=site,
        num_samples=samples,
        base_hash=root.model_hash,
        metrics=metrics,
        federation=root.federation,
        run_id=root.run_id,
    )
    meta["partial"] = json.dumps(
        {"devices": devices, "site_federation": site_federation}, sort_keys=True
    )
    if sign_key is not None:
        meta["signature"] = signing.sign(sign_key, weights, meta)
    return codec.encode(weights, meta)


class Upstream:
    """The root's models for the engine, and the site's partials for the root."""

    def __init__(
        self,
        credentials: str | Path,
        connection: ConnectionSettings,
        *,
        site_federation: str,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        creds = load_credentials(credentials)
        if not creds.get("device_id") or not creds.get("signing_key"):
            raise ConfigError(f"{credentials}: not a site's root credentials (no device key)")
        if not creds.get("model_key"):
            raise ConfigError(f"{credentials}: no model_key: the root's models cannot be checked")
        self.root = Topics(creds["federation"])
        if self.root.federation == site_federation:
            raise ConfigError(
                f"{credentials} is for federation {site_federation!r}, the site's own: "
                "--upstream takes the site's credentials at the root"
            )
        self.site = creds["device_id"]
        self.site_federation = site_federation
        self.max_payload = max_payload
        self._sign_key = signing.load_private(creds["signing_key"])
        self._root_key = signing.load_public(creds["model_key"])
        self._lock = threading.Lock()
        self._latest: messages.ModelMessage | None = None
        self._arrived = threading.Event()
        self._given: dict[int, messages.ModelMessage] = {}  # round -> the model the site used
        self._resent: set[int] = set()
        self._run_id: str | None = None  # the root run this site's run follows
        self.partials_dir: Path | None = None  # set by the engine: <run_dir>/partials
        self.refused = 0  # root models that failed their checks
        self.forwarded: list[tuple[int, int]] = []  # (round, payload bytes)
        self.connection = connection
        self.client = make_client(
            connection,
            client_id=f"fedmq-site-upstream-{self.site}",
            persistent=True,
            will=(self.root.status(self.site), self._status("offline")),
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._watch: ConnectionWatch | None = None

    def describe(self) -> dict:
        """For the site's state topic: whose site this is and what went up."""
        last = self.forwarded[-1] if self.forwarded else None
        return {
            "root_federation": self.root.federation,
            "site": self.site,
            "root_round": None if self._latest is None else self._latest.round,
            "partials_sent": len(self.forwarded),
            "last_partial": None if last is None else {"round": last[0], "bytes": last[1]},
            "refused_root_models": self.refused,
        }

    def _status(self, status: str) -> bytes:
        return signals.encode_status(status, self.site, reason=f"site {self.site_federation}")

    # -- network thread ---------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe(self.root.model, options=mqtt.SubscribeOptions(qos=1))
        client.publish(self.root.status(self.site), self._status("online"), qos=1, retain=True)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.root.model or not msg.payload:
            return
        try:
            model = messages.decode_model(msg.payload, max_payload=self.max_payload)
            signing.verify(self._root_key, model.tensors, model.metadata)
            if model.federation != self.root.federation:
                raise CodecError(f"model of federation {model.federation!r}", reason="wrong_run")
        except CodecError as exc:
            self.refused += 1
            log.warning("refused a root model: %s (%s)", exc.reason, exc)
            return
        with self._lock:
            self._latest = model
        self._arrived.set()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Connect to the site's broker; raise BrokerError if it cannot be reached."""
        self._watch = ConnectionWatch(self.client, self.connection, log)
        connect_async(self.client, self.connection, persistent=True)
        self.client.loop_start()
        self._watch.wait_connected(timeout)

    def stop(self, status: str = "offline") -> None:
        if self._watch is not None and self._watch.connected.is_set():
            info = self.client.publish(
                self.root.status(self.site), self._status(status), qos=1, retain=True
            )
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def first_model(self, timeout: float) -> messages.ModelMessage:
        """The root's current model (its task is the site's): wait for it up to ``timeout``."""
        if not self._arrived.wait(timeout):
            raise ConfigError(
                f"no model of the root federation {self.root.federation!r} reached this site "
                f"within {timeout:g}s: is the bridge up (mosquitto.log of the site's broker) "
                "and the root's aggregator running?"
            )
        with self._lock:
            assert self._latest is not None
            return self._latest

    # -- the engine's seam ----------------------------------------------------------------
    def model_for(self, number: int, completed: int) -> messages.ModelMessage | None:
        """The root's model for the site's round ``number`` or a later one (the root moved
        on) or its final model; None while the root is still on a round the site has done
        (``completed``), whose saved partial is then sent again once."""
        with self._lock:
            model = self._latest
        if model is None:
            return None
        self._check_run(model)
        if model.final or model.round >= number:
            self._given[model.round] = model
            return model
        if model.round == completed and completed not in self._resent:
            self._resent.add(completed)
            self._resend(completed)
        return None

    def _check_run(self, model: messages.ModelMessage) -> None:
        """A site's run follows one run of the root: the first root model it uses fixes it
        (kept in the partials directory), and a model of another run stops the site."""
        if model.run_id == self._run_id:
            return
        check_site_task(model.task)  # the root's: a site refuses what it cannot fold
        if self.partials_dir is None:
            self._run_id = model.run_id
            return
        path = self.partials_dir / "root_run_id"
        if not path.exists():
            self.partials_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, model.run_id.encode())
        followed = path.read_text().strip()
        if model.run_id == followed:
            self._run_id = followed
        else:
            raise FedmqError(
                f"the root {self.root.federation!r} started another run ({model.run_id}; this "
                f"site's run followed {followed}): start the site aggregator with a new --run-dir"
            )

    def forward(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        *,
        samples: int,
        devices: int,
        metrics: Mapping[str, float],
    ) -> int:
        """Send round ``number``'s partial result to the root; its size in bytes."""
        root = self._given[number]
        payload = partial_update(
            weights,
            root=root,
            site=self.site,
            samples=samples,
            devices=devices,
            metrics=metrics,
            site_federation=self.site_federation,
            sign_key=self._sign_key,
        )
        if self.partials_dir is not None:  # durable first: a restart sends it again
            self.partials_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self._partial_path(number), payload)
        self._resent.add(number)
        self._publish(payload)
        self.forwarded.append((number, len(payload)))
        log.info(
            "round %d: sent the site's partial result to %s (%d devices, %d samples, %d bytes)",
            number,
            self.root.federation,
            devices,
            samples,
            len(payload),
        )
        return len(payload)

    def _partial_path(self, number: int) -> Path:
        assert self.partials_dir is not None
        return self.partials_dir / f"round-{number:06d}.safetensors"

    def _resend(self, number: int) -> None:
        if self.partials_dir is None or not self._partial_path(number).exists():
            return
        log.info("round %d: the root has not closed it yet; sending the partial again", number)
        self._publish(self._partial_path(number).read_bytes())

    def _publish(self, payload: bytes) -> None:
        # QoS 1 to the site's broker, whose bridge queues it while the uplink is down;
        # paho re-sends it if the site's broker restarts before acknowledging it
        self.client.publish(self.root.update(self.site), payload, qos=1)
