"""Keyed Gaussian noise: reproducible per (key, label), the right distribution, fast.

The known-answer test recomputes the first values from scratch (HKDF with hmac,
ChaCha20 from RFC 8439 in plain Python, Box-Muller with math), so it pins the
construction written in the module docstring, not just a snapshot of its output.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import time

import pytest
import torch

from aggregator.privacy import noise

KEY = bytes(range(32))

# First values of stream "round-1" under KEY (std 1), as produced when this test was
# written; test_known_answer_matches_the_construction re-derives them independently.
KAT = [
    -0.05298806604125398,
    0.20933175612084717,
    -1.4064900779073928,
    -0.11588516056826505,
    2.642191817886379,
    0.6807047697069387,
]


# --- an independent reference: RFC 5869 HKDF and RFC 8439 ChaCha20, in plain Python ---


def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()  # salt absent -> 32 zero bytes
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 7)


def _chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state += list(struct.unpack("<8I", key)) + [counter] + list(struct.unpack("<3I", nonce))
    work = list(state)
    for _ in range(10):
        _quarter(work, 0, 4, 8, 12)
        _quarter(work, 1, 5, 9, 13)
        _quarter(work, 2, 6, 10, 14)
        _quarter(work, 3, 7, 11, 15)
        _quarter(work, 0, 5, 10, 15)
        _quarter(work, 1, 6, 11, 12)
        _quarter(work, 2, 7, 8, 13)
        _quarter(work, 3, 4, 9, 14)
    return struct.pack("<16I", *((w + s) & 0xFFFFFFFF for w, s in zip(work, state)))


def _reference_normals(key: bytes, label: str, count: int) -> list[float]:
    derived = _hkdf_sha256(key, b"fedmq/privacy/noise/v1:" + label.encode())
    blocks = (count + 7) // 8  # a 64-byte block holds 8 words = 4 pairs
    stream = b"".join(_chacha20_block(derived, i, bytes(12)) for i in range(blocks))
    words = struct.unpack(f"<{8 * blocks}Q", stream)
    values = []
    for i in range(0, len(words), 2):
        u1 = ((words[i] >> 11) + 1) * 2.0**-53
        u2 = ((words[i + 1] >> 11) + 1) * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        values += [r * math.cos(2.0 * math.pi * u2), r * math.sin(2.0 * math.pi * u2)]
    return values[:count]


def test_reference_chacha20_matches_rfc8439_test_vector():
    # RFC 8439 section 2.3.2: key 00..1f, counter 1, nonce 000000090000004a00000000.
    block = _chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert block[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"
    assert block[-16:].hex() == "b5129cd1de164eb9cbd083e8a2503c4e"


def test_known_answer_matches_the_construction():
    got = noise.gaussian(KEY, "round-1", (len(KAT),), 1.0).tolist()
    assert got == KAT
    reference = _reference_normals(KEY, "round-1", 40)
    assert reference[: len(KAT)] == pytest.approx(KAT, rel=1e-14, abs=1e-15)
    longer = noise.gaussian(KEY, "round-1", (40,), 1.0).tolist()
    assert longer == pytest.approx(reference, rel=1e-14, abs=1e-15)


def test_same_key_and_label_give_bit_identical_noise():
    a = noise.gaussian(KEY, "round-3", (1000,), 0.7)
    b = noise.gaussian(bytes(KEY), "round-3", (1000,), 0.7)
    assert a.dtype == torch.float64
    assert torch.equal(a, b)


def test_other_label_or_key_gives_other_noise():
    base = noise.gaussian(KEY, "round-3", (1000,), 1.0)
    other_label = noise.gaussian(KEY, "round-4", (1000,), 1.0)
    other_key = noise.gaussian(bytes([1]) + KEY[1:], "round-3", (1000,), 1.0)
    # Independent normals: correlation near 0, and no value repeats.
    for other in (other_label, other_key):
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1].item()) < 0.15
        assert not torch.isin(base, other).any()


def test_std_scales_the_same_stream():
    unit = noise.gaussian(KEY, "r", (100,), 1.0)
    assert torch.equal(noise.gaussian(KEY, "r", (100,), 2.5), unit * 2.5)
    assert torch.equal(noise.gaussian(KEY, "r", (100,), 0.0), torch.zeros(100, dtype=torch.float64))


def test_shape_is_a_view_of_the_same_stream():
    flat = noise.gaussian(KEY, "r", (24,), 1.0)
    assert torch.equal(noise.gaussian(KEY, "r", (2, 3, 4), 1.0), flat.view(2, 3, 4))
    assert noise.gaussian(KEY, "r", (0,), 1.0).shape == (0,)
    assert noise.gaussian(KEY, "r", (), 1.0).item() == flat[0].item()


@pytest.mark.parametrize("chunk_pairs", [1, 3, 1000])
@pytest.mark.parametrize("count", [1, 2, 7, 10_001])
def test_chunk_size_does_not_change_values(monkeypatch, chunk_pairs, count):
    whole = noise.gaussian(KEY, "chunks", (count,), 1.0)
    monkeypatch.setattr(noise, "CHUNK_PAIRS", chunk_pairs)
    assert torch.equal(noise.gaussian(KEY, "chunks", (count,), 1.0), whole)


def test_a_prefix_of_a_longer_draw_is_the_shorter_draw():
    assert torch.equal(
        noise.gaussian(KEY, "r", (11,), 1.0), noise.gaussian(KEY, "r", (5000,), 1.0)[:11]
    )


def test_statistics_of_a_million_draws():
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1_000_000
    std = 2.5
    x = noise.gaussian(KEY, "stats", (n,), std)
    mean = x.mean().item()
    sd = x.std().item()
    z = (x - mean) / sd
    skew = (z**3).mean().item()
    kurtosis = (z**4).mean().item()
    assert abs(mean) < 5 * std / math.sqrt(n)
    assert abs(sd / std - 1) < 0.01
    assert abs(skew) < 6 * math.sqrt(6 / n)  # standard error of the skewness ~ sqrt(6/n)
    assert abs(kurtosis - 3) < 6 * math.sqrt(24 / n)  # and of the kurtosis ~ sqrt(24/n)
    result = scipy_stats.kstest(x.numpy() / std, "norm")
    assert result.pvalue > 1e-3, result


def test_tails_are_reached():
    # 53-bit uniforms reach ~8.6 sigma; 1M draws should show a few beyond 4 sigma
    # (expected 63), and none is infinite.
    x = noise.gaussian(KEY, "tails", (1_000_000,), 1.0)
    assert torch.isfinite(x).all()
    assert 30 < (x.abs() > 4).sum().item() < 110


def test_gaussian_like_follows_sorted_names_not_dict_order():
    tensors = {
        "b.weight": torch.zeros(3, 2),
        "a.bias": torch.zeros(4, dtype=torch.float32),
        "steps": torch.zeros(2, dtype=torch.long),
        "c": torch.zeros((), dtype=torch.float16),
    }
    out = noise.gaussian_like(KEY, "round-9", tensors, 0.5)
    flipped = noise.gaussian_like(KEY, "round-9", dict(reversed(tensors.items())), 0.5)
    assert list(out) == ["a.bias", "b.weight", "c"]  # the integer counter gets no noise
    for name in out:
        assert torch.equal(out[name], flipped[name])
        assert out[name].dtype == torch.float64
        assert out[name].shape == tensors[name].shape
    flat = noise.gaussian(KEY, "round-9", (4 + 6 + 1,), 0.5)
    assert torch.equal(out["a.bias"], flat[:4])
    assert torch.equal(out["b.weight"], flat[4:10].view(3, 2))
    assert torch.equal(out["c"], flat[10].view(()))


def test_short_key_and_bad_std_are_refused():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        noise.gaussian(bytes(31), "r", (3,), 1.0)
    with pytest.raises(ValueError, match="std"):
        noise.gaussian(KEY, "r", (3,), -1.0)
    with pytest.raises(ValueError, match="std"):
        noise.gaussian(KEY, "r", (3,), float("nan"))


def test_new_key_is_32_fresh_bytes():
    a, b = noise.new_key(), noise.new_key()
    assert len(a) == 32 and a != b
    noise.gaussian(a, "r", (3,), 1.0)  # usable as is


def test_speed_of_ten_million_values():
    start = time.perf_counter()
    x = noise.gaussian(KEY, "speed", (10_000_000,), 1.0)
    seconds = time.perf_counter() - start
    print(f"\n10M Gaussian values from ChaCha20: {seconds:.3f} s")
    assert x.shape == (10_000_000,)
    assert seconds < 5.0  # well under 2 s on a 2-core box; loose for a loaded CI
