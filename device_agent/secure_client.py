"""A device's side of a secure-aggregation round (SecAgg+, Bell et al. 2020): no MQTT
here, only what to send in answer to what.

    advertise   two fresh X25519 key pairs: c (to encrypt shares), s (to agree masks)
    on_roster   check every neighbour's advertisement (its device key, certified by the
                federation's registry), then Shamir-share the self-mask seed b and s's
                private key among the neighbours, each share pair sealed for its recipient
    on_deliver  open the shares the neighbours who shared sent us
    masked      quantize ``[a * delta, a]`` (stochastic rounding) and add, modulo 2^32,
                PRG(b) and ±PRG(s_uv) for every neighbour v that shared
    on_unmask   for each neighbour: its b-share if its masked input arrived, its s-share
                if it dropped out; never both, and never an s-share for a neighbour whose
                receipt says it sent its input (the aggregator would unmask it)

Every refusal raises ``Refused`` with the reason; the agent logs it and sends nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker import identity, signing
from broker.errors import CodecError
from broker.secagg import keys, prg, quantize, shamir, wire
from broker.secagg.plan import MIN_ROSTER
from broker.secagg.protocol import (
    SHARE_INFO,
    flatten_update,
    pair_mask,
    pair_sign,
    round_graph,
    seed_commitment,
    share_aad,
    x_of,
)
from broker.secagg.wire import SecureMessage, SecurePlan


class Refused(Exception):
    """This device will not take this step; the message says why."""


@dataclass(frozen=True)
class Identity:
    """What a device needs to check its peers' advertisements (``broker/identity.py``)."""

    public: bytes  # this device's raw Ed25519 public key
    cert: bytes  # the registry's signature of it
    registry: Ed25519PublicKey | None  # None: peers are not checked (insecure runs only)


@dataclass
class SecureClient:
    device_id: str
    plan: SecurePlan
    round: int
    model_hash: str
    federation: str
    run_id: str
    identity: Identity
    sign: Callable[[dict, dict], str] | None
    c: keys.KeyPair = field(default_factory=keys.KeyPair.generate)
    s: keys.KeyPair = field(default_factory=keys.KeyPair.generate)
    b: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: dict[str, wire.Keys] = field(default_factory=dict)
    identities: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    neighbours: tuple[str, ...] = ()
    threshold: int = 0
    sharers: tuple[str, ...] | None = None  # who shared (from the aggregator's delivery)
    received: dict[str, tuple[int, int]] = field(default_factory=dict)  # v -> (b, s) shares
    receipts: set[str] = field(default_factory=set)  # neighbours known to have sent input
    sent_input: bool = False
    revealed: bool = False

    @property
    def session(self) -> str:
        return self.plan.session

    def _encode(self, kind: str, fields: Mapping[str, object], tensors=None) -> bytes:
        return wire.encode_as(self, kind, fields, tensors)

    # -- 1: advertise ---------------------------------------------------------------
    def keys_message(self) -> bytes:
        return self._encode(
            "keys",
            {
                "c_pk": wire.b64(self.c.public),
                "s_pk": wire.b64(self.s.public),
                "identity": wire.b64(self.identity.public),
                "cert": wire.b64(self.identity.cert),
                "model_hash": self.model_hash,
                "b_hash": seed_commitment(self.b),  # lets the aggregator spot a bad share
            },
        )

    # -- 2: share ------------------------------------------------------------------
    def on_roster(self, msg: SecureMessage) -> bytes:
        """Check the roster, then the sealed shares of b and s's key for each neighbour."""
        if self.roster:
            raise Refused("a second roster for the same session")
        if msg.metadata.get("model_hash") != self.model_hash:
            raise Refused("the roster is for another model")
        entries = wire.roster_entries(msg)
        roster: dict[str, wire.Keys] = {}
        for entry in entries:
            adv = self._parse_advertisement(entry)
            if adv.device_id in roster:
                raise Refused(f"device {adv.device_id} twice in the roster")
            roster[adv.device_id] = adv
        if self.device_id not in roster:
            raise Refused("this device is not in the roster")
        mine = roster[self.device_id]
        if (mine.c_pk, mine.s_pk) != (self.c.public, self.s.public):
            raise Refused("the roster holds keys this device did not advertise")
        if len(roster) < MIN_ROSTER:
            raise Refused(f"a roster of {len(roster)} devices (fewer than {MIN_ROSTER})")
        graph, threshold = round_graph(self.session, list(roster.values()), self.plan.dropout)
        said = (msg.metadata.get("threshold"), msg.metadata.get("degree"))
        if said[0] != str(threshold):
            raise Refused(f"the roster says threshold {said[0]}, the graph gives {threshold}")
        self.roster, self.threshold = roster, threshold
        self.neighbours = graph[self.device_id]
        for v in self.neighbours:  # the keys this device will use: each its owner's own
            self._check_identity(roster[v])
        xs = x_of(roster)
        points = [xs[v] for v in self.neighbours]
        b_shares = shamir.split(self.b, points, threshold)
        s_shares = shamir.split(keys.private_bytes(self.s.private), points, threshold)
        sealed = {}
        for v in self.neighbours:
            key = self._share_key(v)
            plain = shamir.share_to_bytes(b_shares[xs[v]]) + shamir.share_to_bytes(s_shares[xs[v]])
            sealed[v] = wire.b64(keys.seal(key, plain, share_aad(self.session, self.device_id, v)))
        return self._encode("shares", {"shares": sealed})

    def _share_key(self, v: str) -> bytes:
        return keys.agree(self.c.private, self.roster[v].c_pk, SHARE_INFO + self.session.encode())

    def _parse_advertisement(self, entry: dict[str, str]) -> wire.Keys:
        meta = dict(entry)
        if meta.get("kind") != "keys" or meta.get("session") != self.session:
            raise Refused("a roster entry that is not this session's key advertisement")
        if meta.get("round") != str(self.round) or meta.get("federation") != self.federation:
            raise Refused("a roster entry for another round or federation")
        if meta.get("run_id") != self.run_id:
            raise Refused("a roster entry for another run")
        device = meta.get("device_id", "")
        try:
            return wire.parse_keys(
                SecureMessage("keys", self.round, self.session, "", "", device, meta)
            )
        except CodecError as exc:
            raise Refused(f"roster entry of {device!r}: {exc}") from None

    def _check_identity(self, adv: wire.Keys) -> None:
        """``adv`` is signed by its device's key, which the registry certified. Checked for
        the neighbours, whose keys this device uses; every key enters the graph's seed."""
        if self.identity.registry is None:
            return
        try:
            public = identity.check(
                self.identity.registry, self.federation, adv.device_id, adv.identity, adv.cert
            )
            signing.verify(public, {}, adv.metadata)
        except CodecError as exc:
            raise Refused(f"the advertisement of {adv.device_id}: {exc}") from None
        self.identities[adv.device_id] = public

    # -- 3: masked input -----------------------------------------------------------
    def on_deliver(self, msg: SecureMessage) -> None:
        if not self.roster:
            raise Refused("shares delivered before the roster")
        sharers = wire.ids_field(msg, "sharers")
        if not set(sharers) <= set(self.roster) or self.device_id not in sharers:
            raise Refused("the sharers are not a part of the roster holding this device")
        if len(sharers) < self.threshold:
            raise Refused(f"only {len(sharers)} devices shared (threshold {self.threshold})")
        sealed = wire.shares_field(msg)
        expected = set(self.neighbours) & set(sharers)
        if set(sealed) != expected:
            raise Refused("the delivered shares are not exactly those of the sharing neighbours")
        for v, blob in sealed.items():
            key = keys.agree(
                self.c.private, self.roster[v].c_pk, SHARE_INFO + self.session.encode()
            )
            try:
                plain = keys.unseal(key, blob, share_aad(self.session, v, self.device_id))
                b_share = shamir.share_from_bytes(plain[: shamir.SHARE_BYTES])
                s_share = shamir.share_from_bytes(plain[shamir.SHARE_BYTES :])
            except ValueError as exc:
                raise Refused(f"the share from {v} does not open: {exc}") from None
            self.received[v] = (b_share, s_share)
        self.sharers = sharers

    def masked_vector(
        self,
        base: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        num_samples: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """The masked fixed-point ``[a * delta, a]`` (uint32), with the plan's DP noise."""
        if self.sharers is None:
            raise Refused("no masked input before the shares are delivered")
        rng = rng or np.random.default_rng(secrets.randbits(128))
        weight = min(num_samples, self.plan.max_weight) / self.plan.max_weight
        vector = flatten_update(base, trained, weight)
        if self.plan.noise > 0:  # this device's share of the DP noise (not on the weight)
            noise_rng = np.random.default_rng(secrets.randbits(128))
            vector[:-1] += noise_rng.normal(0.0, self.plan.noise, vector.size - 1)
        levels = quantize.levels_for(self.plan.selected)
        out = quantize.quantize(vector, self.plan.clip, levels, rng)
        out = quantize.add_mod(out, prg.mask(self.b, out.size))
        for v in self.neighbours:
            if v not in self.sharers:
                continue
            mask = pair_mask(self.s.private, self.roster[v].s_pk, self.session, out.size)
            if pair_sign(self.device_id, v) > 0:
                out = quantize.add_mod(out, mask)
            else:
                out = quantize.sub_mod(out, mask)
        return out

    def masked_message(self, vector: np.ndarray, metrics: Mapping[str, float]) -> bytes:
        self.sent_input = True
        metrics_json = {k: float(v) for k, v in metrics.items()}
        return self._encode(
            "masked", {"metrics": metrics_json}, tensors={wire.MASKED: wire.masked_tensor(vector)}
        )

    def receipt_message(self) -> bytes:
        return self._encode("sent", {})

    def on_receipt(self, msg: SecureMessage) -> None:
        """A neighbour's receipt that it sent its masked input (checked with its key)."""
        if wire.same(msg, "sent", self.round, self.session) is not None:
            return
        v = msg.device_id
        if v not in self.neighbours:
            return
        public = self.identities.get(v)
        if public is not None:
            signing.verify(public, {}, msg.metadata)
        elif self.identity.registry is not None:
            return
        self.receipts.add(v)

    # -- 4: unmask -------------------------------------------------------------------
    def on_unmask(self, msg: SecureMessage) -> bytes:
        if self.sharers is None or not self.sent_input:
            raise Refused("asked to unmask before this device sent its masked input")
        if self.revealed:
            raise Refused("asked to unmask a second time in one session")
        survivors = set(wire.ids_field(msg, "survivors"))
        if not survivors <= set(self.sharers):
            raise Refused("survivors that never shared")
        if self.device_id not in survivors:
            raise Refused("the aggregator says this device's input did not arrive, yet it sent it")
        if len(survivors) < self.threshold:
            raise Refused(
                f"only {len(survivors)} survivors, fewer than the threshold {self.threshold}: "
                "unmasking so few would expose them"
            )
        dropped = (set(self.sharers) - survivors) & set(self.neighbours)
        exposed = sorted(dropped & self.receipts)
        if exposed:
            raise Refused(
                f"asked for the mask key of {', '.join(exposed)}, whose receipt says it sent "
                "its masked input: revealing it would unmask that device"
            )
        b_out, s_out = {}, {}
        for v, (b_share, s_share) in self.received.items():
            if v in survivors:
                b_out[v] = wire.b64(shamir.share_to_bytes(b_share))
            elif v in dropped:
                s_out[v] = wire.b64(shamir.share_to_bytes(s_share))
        self.revealed = True
        return self._encode("reveal", {"b": b_out, "s": s_out})
