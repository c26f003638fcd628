"""What both ends of a secure-aggregation round compute the same way: the graph of
who shares with whom, the keys and masks between two devices, and how a model's
tensors become the one vector that is masked and summed.

The vector a device contributes is ``[a * delta, a]``: its update ``w - g`` over every
tensor (flattened in name order, as float64), times its weight ``a = min(n, W) / W``
(n its sample count, W the plan's ``max_weight``), with ``a`` itself appended; integer
buffers travel divided by ``INT_SCALE``. The
sum over devices is then ``[Σ a_i delta_i, Σ a_i]``, and their ratio is exactly
FedAvg's sample-weighted mean, though nobody saw any ``a_i`` or ``delta_i``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from broker.secagg import graph, keys, prg
from broker.secagg.wire import Keys

MASK_INFO = b"mask "
INT_SCALE = 2**16
SHARE_INFO = b"share "


def graph_seed(session: str, roster: Sequence[Keys]) -> bytes:
    """The seed of the round's random graph: every advertised key goes into it, so the
    aggregator cannot choose the graph without choosing (and redoing) the keys."""
    h = hashlib.sha256(b"fedmq secagg graph\x00" + session.encode())
    for k in sorted(roster, key=lambda k: k.device_id):
        h.update(k.device_id.encode() + b"\x00" + k.c_pk + k.s_pk)
    return h.digest()


def round_graph(
    session: str, roster: Sequence[Keys], dropout: float
) -> tuple[dict[str, tuple[str, ...]], int]:
    """(neighbours of each device, Shamir threshold) of a roster, the degree sized so the
    round survives ``dropout`` (the plan's bound)."""
    ids = sorted(k.device_id for k in roster)
    degree = graph.degree_for(len(ids), dropout)
    return graph.neighbours(ids, degree, graph_seed(session, roster)), graph.threshold_for(degree)


def seed_commitment(seed: bytes) -> str:
    """What a device says of its self-mask seed b at advertisement: a recovered b that does
    not hash to it was rebuilt from a bad share."""
    return hashlib.sha256(b"fedmq secagg seed\x00" + seed).hexdigest()


def x_of(ids: Sequence[str]) -> dict[str, int]:
    """Each device's Shamir evaluation point: its place in the sorted roster, from 1."""
    return {d: i + 1 for i, d in enumerate(sorted(ids))}


def share_aad(session: str, sender: str, recipient: str) -> bytes:
    return f"fedmq secagg share\x00{session}\x00{sender}\x00{recipient}".encode()


def pair_mask(private, peer_public: bytes, session: str, length: int) -> np.ndarray:
    """The mask two devices agree on without talking: PRG(HKDF(X25519(s_u, s_v)))."""
    return prg.mask(keys.agree(private, peer_public, MASK_INFO + session.encode()), length)


def pair_sign(me: str, other: str) -> int:
    """+1: ``me`` adds the pair's mask, -1: subtracts it (the other does the opposite)."""
    return 1 if me < other else -1


def vector_length(template: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in template.values()) + 1


def _scale(t: torch.Tensor) -> float:
    """Integer buffers (BatchNorm's batch counters) change by whole numbers of batches, far
    beyond a weight's range: they travel divided by INT_SCALE (rounding needs only ±0.5)."""
    return 1.0 if t.dtype.is_floating_point else 1.0 / INT_SCALE


def flatten_update(
    base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], weight: float
) -> np.ndarray:
    """``[weight * (trained - base), weight]`` as one float64 vector, tensors in name order."""
    parts = [
        (trained[k].to(torch.float64) - base[k].to(torch.float64)).reshape(-1).numpy()
        * (weight * _scale(base[k]))
        for k in sorted(base)
    ]
    return np.concatenate([*parts, [weight]])


def unflatten_mean(
    base: Mapping[str, torch.Tensor], total: np.ndarray
) -> tuple[dict[str, torch.Tensor], float]:
    """``base + Σ a_i delta_i / Σ a_i`` in each tensor's own dtype, and ``Σ a_i``."""
    weight = float(total[-1])
    if not weight > 0:
        raise ValueError(f"the devices' weights sum to {weight}")
    out, at = {}, 0
    for k in sorted(base):
        t = base[k]
        n = t.numel()
        part = total[at : at + n] / (weight * _scale(t))
        delta = torch.from_numpy(np.ascontiguousarray(part)).reshape(t.shape)
        value = t.to(torch.float64) + delta
        out[k] = value.to(t.dtype) if t.dtype.is_floating_point else value.round().to(t.dtype)
        at += n
    return out, weight
