"""The aggregator's side of a secure-aggregation round (SecAgg+): pure bookkeeping, no
MQTT. The engine (``service.py``) feeds it the devices' messages, publishes what it
returns and asks it when a phase may close.

    keys    collect the selected devices' key advertisements -> the roster (U1)
    shares  collect each device's sealed shares for its neighbours -> deliver them (U2)
    masked  fold each masked input into a running sum modulo 2^32 -> survivors (U3)
    unmask  collect, from survivors, b-shares of survivors and s-shares of the dropped;
            as soon as each has t: remove the masks, and the sum is all that is left

The aggregator never holds an individual unmasked vector: it reconstructs the self-mask
seed b only of devices whose masked input it summed, and the mask key s only of devices
whose input it did not; a masked input arriving after the survivors were named is
refused (``late``).
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from broker.errors import CodecError
from broker.secagg import graph, keys, prg, quantize, shamir, wire
from broker.secagg.protocol import (
    pair_mask,
    pair_sign,
    round_graph,
    seed_commitment,
    unflatten_mean,
    x_of,
)
from broker.secagg.wire import SecureMessage, SecurePlan

Verify = Callable[[str, dict, dict], None]  # (device, tensors, metadata) -> None or CodecError


UNMASK_WORKERS = max(2, os.cpu_count() or 2)  # threads removing masks (ChaCha20 in C)
MAX_SUBSETS = 64  # t-subsets of one secret's shares tried before giving up on it


def _subsets(xs: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """t-subsets of ``xs`` to try: the sliding windows first (each leaves out different
    shares, so one bad share is stepped around within len - t + 1 tries), then random ones."""
    for start in range(len(xs) - t + 1):
        yield tuple(xs[start : start + t])
    rng = random.Random(len(xs))  # which subsets: no secret, just a spread
    while True:
        yield tuple(sorted(rng.sample(xs, t)))


def _public_of(private: bytes) -> bytes | None:
    try:
        return keys.KeyPair.from_private(keys.private_from_bytes(private)).public
    except ValueError:
        return None


class SecureFailure(Exception):
    """The round cannot be unmasked (too few survivors or shares); nothing was unmasked."""


@dataclass
class SecureRound:
    plan: SecurePlan
    round: int
    model_hash: str
    selected: tuple[str, ...]
    template: Mapping[str, torch.Tensor]  # the global model the updates are deltas from
    federation: str
    run_id: str
    sign: Callable[[dict, dict], str] | None = None
    advertised: dict[str, wire.Keys] = field(default_factory=dict)
    roster: tuple[str, ...] = ()  # U1
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)
    threshold: int = 0
    sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> {to: blob}
    sharers: tuple[str, ...] = ()  # U2
    total: np.ndarray | None = None  # Σ masked inputs mod 2^32
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # survivor -> metrics
    masked_bytes: int = 0
    survivors: tuple[str, ...] = ()  # U3
    b_shares: dict[str, dict[int, int]] = field(default_factory=dict)  # survivor -> {x: y}
    s_shares: dict[str, dict[int, int]] = field(default_factory=dict)  # dropped -> {x: y}
    revealed: set[str] = field(default_factory=set)
    unmask_seconds: float = 0.0  # removing the masks: the aggregator's secure-only work

    @property
    def session(self) -> str:
        return self.plan.session

    @property
    def length(self) -> int:
        return sum(t.numel() for t in self.template.values()) + 1

    def _encode(self, kind: str, fields: Mapping[str, object], tensors=None) -> bytes:
        return wire.encode_as(self, kind, fields, tensors)

    def check(self, msg: SecureMessage, kind: str, allowed: Sequence[str]) -> None:
        why = wire.same(msg, kind, self.round, self.session)
        if why is not None:
            raise CodecError(why, reason="wrong_phase" if msg.kind != kind else "late")
        if (msg.federation, msg.run_id) != (self.federation, self.run_id):
            raise CodecError("for another federation or run", reason="wrong_run")
        if msg.device_id not in allowed:
            raise CodecError(f"{msg.device_id} is not part of this step", reason="not_selected")

    # -- keys -> roster ----------------------------------------------------------------
    def take_keys(self, msg: SecureMessage) -> bool:
        self.check(msg, "keys", self.selected)
        if msg.device_id in self.advertised:
            return False
        if msg.metadata.get("model_hash") != self.model_hash:
            raise CodecError("keys for another model", reason="stale")
        self.advertised[msg.device_id] = wire.parse_keys(msg)
        return True

    def roster_message(self) -> bytes:
        """Close the key phase: the roster of who advertised, with their own signatures."""
        ids = tuple(sorted(self.advertised))
        self.roster = ids
        self.neighbours, self.threshold = round_graph(
            self.session, [self.advertised[d] for d in ids], self.plan.dropout
        )
        return self._encode(
            "roster",
            {
                "devices": [self.advertised[d].metadata for d in ids],
                "threshold": str(self.threshold),
                "degree": str(graph.degree_for(len(ids), self.plan.dropout)),
                "model_hash": self.model_hash,
            },
        )

    # -- shares -> deliveries ----------------------------------------------------------
    def take_shares(self, msg: SecureMessage) -> bool:
        self.check(msg, "shares", self.roster)
        if msg.device_id in self.sealed:
            return False
        sealed = wire.shares_field(msg)
        if set(sealed) != set(self.neighbours[msg.device_id]):
            raise CodecError("shares not addressed to exactly its neighbours", reason="bad_shares")
        self.sealed[msg.device_id] = sealed
        return True

    def deliveries(self) -> dict[str, bytes]:
        """Close the share phase: for each device that shared, what its neighbours sealed
        for it, and who shared (U2)."""
        self.sharers = tuple(sorted(self.sealed))
        out = {}
        for v in self.sharers:
            mine = {
                u: wire.b64(self.sealed[u][v])
                for u in self.neighbours[v]
                if u in self.sealed and v in self.sealed[u]
            }
            out[v] = self._encode("deliver", {"sharers": list(self.sharers), "shares": mine})
        self.sealed.clear()  # forwarded: nothing here can open them
        return out

    # -- masked inputs -----------------------------------------------------------------
    def take_masked(self, msg: SecureMessage, size: int) -> bool:
        if self.survivors:
            raise CodecError("masked input after the survivors were named", reason="late")
        self.check(msg, "masked", self.sharers)
        if msg.device_id in self.metrics:
            return False
        vector = wire.masked_vector(msg)
        metrics = wire.metrics_of(msg)
        self.total = vector.copy() if self.total is None else quantize.add_mod(self.total, vector)
        self.metrics[msg.device_id] = metrics
        self.masked_bytes += size
        return True

    def unmask_message(self) -> bytes:
        """Close the input phase: name the survivors (U3) and ask them for shares."""
        self.survivors = tuple(sorted(self.metrics))
        return self._encode("unmask", {"survivors": list(self.survivors)})

    # -- reveal -> the sum ---------------------------------------------------------------
    def take_reveal(self, msg: SecureMessage) -> bool:
        self.check(msg, "reveal", self.survivors)
        u = msg.device_id
        if u in self.revealed:
            return False
        b = wire.device_map(msg.json_field("b", 1 << 20), "reveal b")
        s = wire.device_map(msg.json_field("s", 1 << 20), "reveal s")
        mine = set(self.neighbours[u]) & set(self.sharers)
        if set(b) != mine & set(self.survivors) or set(s) != mine - set(self.survivors):
            raise CodecError(
                "reveal does not hold exactly its neighbours' shares", reason="bad_shares"
            )
        x = x_of(self.roster)[u]
        try:
            for v, share in b.items():
                self.b_shares.setdefault(v, {})[x] = shamir.share_from_bytes(
                    wire.unb64(share, "b share", size=shamir.SHARE_BYTES)
                )
            for v, share in s.items():
                self.s_shares.setdefault(v, {})[x] = shamir.share_from_bytes(
                    wire.unb64(share, "s share", size=shamir.SHARE_BYTES)
                )
        except ValueError as exc:
            raise CodecError(f"a malformed share: {exc}", reason="bad_shares") from None
        self.revealed.add(u)
        return True

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(d for d in self.sharers if d not in set(self.survivors))

    def missing(self) -> dict[str, int]:
        """Devices whose secret still lacks shares -> how many more are needed."""
        out = {}
        for v in self.survivors:
            have = len(self.b_shares.get(v, {}))
            if have < self.threshold:
                out[v] = self.threshold - have
        for v in self.dropped:
            if not set(self.neighbours[v]) & set(self.survivors):
                continue  # no survivor added a mask with it: nothing to remove
            have = len(self.s_shares.get(v, {}))
            if have < self.threshold:
                out[v] = self.threshold - have
        return out

    def failure(self) -> str:
        missing = self.missing()
        worst = sorted(missing.items(), key=lambda kv: -kv[1])[:3]
        return (
            f"secure aggregation cannot unmask the sum: {len(self.revealed)} of "
            f"{len(self.survivors)} survivors revealed shares, and "
            + ", ".join(f"{d} lacks {n}" for d, n in worst)
            + f" of the {self.threshold} shares needed (fewer than t survivors answered); "
            "nothing was unmasked"
        )

    def unmasked_sum(self) -> np.ndarray:
        """Σ of the survivors' quantized vectors (uint32), once every secret has t shares.

        Each secret's masks are a job of its own (PRG expansion dominates: one 100k-weight
        mask is about 0.3 ms), spread over the machine's cores; the corrections add up
        modulo 2^32, so the order they finish in does not matter."""
        if self.total is None or self.missing():
            raise SecureFailure(self.failure())
        survivors = set(self.survivors)
        jobs = [(self._self_mask, v) for v in self.survivors]
        jobs += [
            (self._pair_masks, v)
            for v in self.dropped
            if any(u in survivors for u in self.neighbours[v])
        ]
        total = self.total.copy()
        workers = min(UNMASK_WORKERS, len(jobs)) or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            chunks = [jobs[i::workers] for i in range(workers)]
            for correction in pool.map(self._corrections, chunks):
                total = quantize.add_mod(total, correction)
        return total

    def _corrections(self, jobs) -> np.ndarray:
        """What to add (mod 2^32) to the sum to take these jobs' masks away."""
        out = np.zeros(self.total.size, dtype=np.uint32)
        for job, device in jobs:
            out = job(device, out)
        return out

    def _self_mask(self, v: str, out: np.ndarray) -> np.ndarray:
        said = self.advertised[v].b_hash
        seed = self._recover(v, self.b_shares[v], lambda b: seed_commitment(b) == said)
        return quantize.sub_mod(out, prg.mask(seed, out.size))

    def _pair_masks(self, v: str, out: np.ndarray) -> np.ndarray:
        """A dropped device's masks with its surviving neighbours: each u added
        pair_sign(u, v) * mask(s_uv); take exactly that away."""
        s_pk = self.advertised[v].s_pk
        secret = self._recover(v, self.s_shares[v], lambda k: _public_of(k) == s_pk)
        s_private = keys.private_from_bytes(secret)
        survivors = set(self.survivors)
        for u in self.neighbours[v]:
            if u not in survivors:
                continue
            mask = pair_mask(s_private, self.advertised[u].s_pk, self.session, out.size)
            if pair_sign(u, v) > 0:
                out = quantize.sub_mod(out, mask)
            else:
                out = quantize.add_mod(out, mask)
        return out

    def _recover(
        self, device: str, shares: dict[int, int], valid: Callable[[bytes], bool]
    ) -> bytes:
        """``device``'s secret from its shares, checked against what it advertised; a bad share
        (a neighbour lying) is stepped around by trying other t-subsets, a few at most."""
        for subset in itertools.islice(_subsets(sorted(shares), self.threshold), MAX_SUBSETS):
            try:
                secret = shamir.combine({x: shares[x] for x in subset}, self.threshold, 32)
            except ValueError:
                continue
            if valid(secret):
                return secret
        raise SecureFailure(
            f"the shares of {device}'s secret do not rebuild what it advertised: a neighbour "
            "sent a bad share; nothing was unmasked"
        )

    def result(self) -> tuple[dict[str, torch.Tensor], float]:
        """The next model's candidate: ``g + Σ a_i delta_i / Σ a_i``, and ``Σ a_i * W``."""
        started = time.perf_counter()
        total = self.unmasked_sum()
        self.unmask_seconds = time.perf_counter() - started
        levels = quantize.levels_for(self.plan.selected)
        summed = quantize.dequantize_sum(total, len(self.survivors), self.plan.clip, levels)
        weights, weight = unflatten_mean(self.template, summed)
        return weights, weight * self.plan.max_weight
