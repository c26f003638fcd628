"""Fuzz both ends of secure aggregation: any mutation of a valid protocol message is
either taken or refused with CodecError (aggregator) / Refused or CodecError (device);
nothing else escapes. Signatures are left out on purpose: a device with a valid key can
sign anything, so the parsers behind the check must hold on their own.

The byte-level mutations are those of ``scripts/fuzz_codec.py``; on top of them, each
metadata field is replaced by random JSON (the fields are JSON inside safetensors).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from broker import codec
from broker.errors import CodecError
from broker.secagg import wire
from device_agent.secure_client import Refused
from tests.secagg_sim import Fleet, plan_for

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_codec.py"
_spec = importlib.util.spec_from_file_location("fuzz_codec", _SCRIPT)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)
CASES = 250
MAX = 1 << 24


def field_rewrite(rng: random.Random, payload: bytes) -> bytes:
    """One metadata field set to random JSON, a random string, or removed."""
    p = codec.decode(payload, max_payload=MAX)
    meta = dict(p.metadata)
    key = rng.choice(sorted(meta))
    choice = rng.random()
    if choice < 0.2:
        del meta[key]
    elif choice < 0.6:
        meta[key] = json.dumps(fuzz.random_json(rng))
    else:
        meta[key] = rng.choice(["", "0", "-1", "1" * 40, "[]", "{}", "null", "x" * 300])
    return codec.encode(p.tensors, meta)


def mutations(rng: random.Random, payload: bytes, others: list[bytes]) -> bytes:
    if rng.random() < 0.5:
        return field_rewrite(rng, payload)
    return fuzz.mutate(rng, payload, others)[0]


def stages(n: int = 5):
    """Snapshots of a round at each step, and a valid message for each step."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g), "n": torch.tensor(3)}
    ids = [f"d{i}" for i in range(n)]
    fleet = Fleet(ids)
    plan = plan_for(n)
    server = fleet.aggregator_round(plan, 1, "h" * 64, base)
    clients = {d: fleet.client(d, plan, 1, "h" * 64) for d in ids}
    out = {}

    def dec(payload: bytes, length=None):
        return wire.decode(payload, max_payload=MAX, length=length)

    keys = {d: c.keys_message() for d, c in clients.items()}
    out["keys"] = (copy.deepcopy(server), keys[ids[0]])
    for d in ids:
        server.take_keys(dec(keys[d]))
    roster = server.roster_message()
    device_before_roster = copy.deepcopy(clients[ids[0]])
    shares = {d: c.on_roster(dec(roster)) for d, c in clients.items()}
    out["shares"] = (copy.deepcopy(server), shares[ids[0]])
    for d in ids:
        server.take_shares(dec(shares[d]))
    deliveries = server.deliveries()
    device_before_deliver = copy.deepcopy(clients[ids[0]])
    for d, payload in deliveries.items():
        clients[d].on_deliver(dec(payload))
    masked = {}
    for d, c in clients.items():
        trained = {"w": base["w"] + 0.1, "n": torch.tensor(5)}
        masked[d] = c.masked_message(c.masked_vector(base, trained, 10), {"train_loss": 1.0})
    out["masked"] = (copy.deepcopy(server), masked[ids[0]])
    for d in ids:
        server.take_masked(dec(masked[d], server.length), len(masked[d]))
    request = server.unmask_message()
    device_before_unmask = copy.deepcopy(clients[ids[0]])
    reveal = clients[ids[0]].on_unmask(dec(request))
    out["reveal"] = (copy.deepcopy(server), reveal)
    device = {
        "roster": (device_before_roster, roster),
        "deliver": (device_before_deliver, deliveries[ids[0]]),
        "unmask": (device_before_unmask, request),
    }
    return out, device, server.length


STAGES, DEVICE, LENGTH = stages()
TAKE = {"keys": "take_keys", "shares": "take_shares", "reveal": "take_reveal"}


@pytest.mark.parametrize("step", sorted(STAGES))
def test_the_aggregator_takes_or_refuses_any_mutation(step):
    server0, valid = STAGES[step]
    others = [p for _, p in STAGES.values()]
    rng = random.Random(step)
    outcomes = {"taken": 0, "refused": 0}
    for _ in range(CASES):
        server = copy.deepcopy(server0)
        payload = mutations(rng, valid, others)
        try:
            msg = wire.decode(payload, max_payload=MAX, length=LENGTH)
            if step == "masked":
                server.take_masked(msg, len(payload))
            else:
                getattr(server, TAKE[step])(msg)
            outcomes["taken"] += 1
        except CodecError:
            outcomes["refused"] += 1
    print(step, outcomes)
    assert outcomes["refused"] > CASES // 3  # the mutations do reach the parsers


@pytest.mark.parametrize("step", sorted(DEVICE))
def test_a_device_takes_or_refuses_any_mutation(step):
    client0, valid = DEVICE[step]
    others = [p for _, p in DEVICE.values()]
    rng = random.Random(step)
    outcomes = {"taken": 0, "refused": 0}
    for _ in range(CASES // 2):  # the roster step runs the share split: slower
        client = copy.deepcopy(client0)
        payload = mutations(rng, valid, others)
        try:
            msg = wire.decode(payload, max_payload=MAX)
            {"roster": client.on_roster, "deliver": client.on_deliver, "unmask": client.on_unmask}[
                step
            ](msg)
            outcomes["taken"] += 1
        except (CodecError, Refused):
            outcomes["refused"] += 1
    print(step, outcomes)
    assert outcomes["refused"] > CASES // 6
