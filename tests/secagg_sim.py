"""An in-memory SecAgg+ round between ``SecureClient``s and a ``SecureRound``: every
message goes through its wire encoding and parser, signed and checked, but no broker.
For the protocol's tests and benchmarks; the MQTT run is in test_secagg_engine.py."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.secure_round import SecureRound
from broker import identity, signing
from broker.secagg import wire
from broker.secagg.wire import SecurePlan
from device_agent.secure_client import Identity, SecureClient

FED, RUN = "fed", "run1"
MAX = 64 * 1024 * 1024


def decode(payload: bytes, length: int | None = None) -> wire.SecureMessage:
    return wire.decode(payload, max_payload=MAX, length=length)


@dataclass
class Fleet:
    """Devices with registry-certified keys and an aggregator key."""

    ids: list[str]
    registry: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    aggregator: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    device_keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device_keys = {d: Ed25519PrivateKey.generate() for d in self.ids}

    def verify(self, device: str, tensors: dict, meta: dict) -> None:
        signing.verify(self.device_keys[device].public_key(), tensors, meta)

    def client(self, device: str, plan: SecurePlan, round_: int, model_hash: str) -> SecureClient:
        key = self.device_keys[device]
        cert = identity.certify(self.registry, FED, device, key.public_key())
        ident = Identity(identity.raw_public(key.public_key()), cert, self.registry.public_key())
        return SecureClient(
            device_id=device,
            plan=plan,
            round=round_,
            model_hash=model_hash,
            federation=FED,
            run_id=RUN,
            identity=ident,
            sign=lambda t, m, k=key: signing.sign(k, t, m),
        )

    def aggregator_round(
        self, plan: SecurePlan, round_: int, model_hash: str, template: dict
    ) -> SecureRound:
        return SecureRound(
            plan=plan,
            round=round_,
            model_hash=model_hash,
            selected=tuple(self.ids),
            template=template,
            federation=FED,
            run_id=RUN,
            sign=lambda t, m: signing.sign(self.aggregator, t, m),
        )


def plan_for(n: int, clip: float = 1.0, max_weight: int = 10_000, noise: float = 0.0):
    return SecurePlan(
        session=secrets.token_hex(16), clip=clip, max_weight=max_weight, selected=n, noise=noise
    )


@dataclass
class Outcome:
    server: SecureRound
    clients: dict[str, SecureClient]
    wire: list[bytes]  # every payload that crossed, in order
    upload_bytes: dict[str, int]


def run_round(
    fleet: Fleet,
    base: dict[str, torch.Tensor],
    trained: dict[str, dict[str, torch.Tensor]],
    samples: dict[str, int],
    *,
    plan: SecurePlan | None = None,
    drop_after_shares: set[str] = frozenset(),
    silent_at_unmask: set[str] = frozenset(),
    unmask: bool = True,
) -> Outcome:
    plan = plan or plan_for(len(fleet.ids))
    server = fleet.aggregator_round(plan, 1, "h" * 64, base)
    clients = {d: fleet.client(d, plan, 1, "h" * 64) for d in fleet.ids}
    seen: list[bytes] = []
    up = dict.fromkeys(fleet.ids, 0)

    def send(device: str, payload: bytes, length: int | None = None) -> wire.SecureMessage:
        seen.append(payload)
        up[device] += len(payload)
        msg = decode(payload, length)
        fleet.verify(device, msg.tensors, msg.metadata)
        return msg

    for d, c in clients.items():
        server.take_keys(send(d, c.keys_message()))
    roster = server.roster_message()
    seen.append(roster)
    for d, c in clients.items():
        server.take_shares(send(d, c.on_roster(decode(roster))))
    for d, payload in server.deliveries().items():
        seen.append(payload)
        clients[d].on_deliver(decode(payload))
    length = server.length
    for d, c in clients.items():
        if d in drop_after_shares:
            continue
        vector = c.masked_vector(base, trained[d], samples[d])
        receipt = c.receipt_message()
        seen.append(receipt)
        for other in clients.values():
            other.on_receipt(decode(receipt))
        payload = c.masked_message(vector, {"train_loss": 0.5})
        server.take_masked(send(d, payload, length), len(payload))
    request = server.unmask_message()
    seen.append(request)
    if unmask:
        for d in server.survivors:
            if d in silent_at_unmask:
                continue
            server.take_reveal(send(d, clients[d].on_unmask(decode(request))))
    return Outcome(server, clients, seen, up)


def fedavg(base, trained, samples, devices):
    total = sum(samples[d] for d in devices)

    def delta(d, k):
        return (trained[d][k].to(torch.float64) - base[k].to(torch.float64)) * samples[d]

    return {k: base[k].to(torch.float64) + sum(delta(d, k) for d in devices) / total for k in base}
