"""Known-answer and property tests of the SecAgg+ primitives (broker/secagg).

The KATs come from the standards (RFC 8439 ChaCha20, RFC 7748 X25519) and from
the textbook Shamir example, so they pin the constructions, not a snapshot of
our own output. Everything here is pure and fast.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
from collections import Counter

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker.secagg import graph, keys, prg, quantize, shamir

# --------------------------------------------------------------------------- shamir

WIKI_SHARES = {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
WIKI_SECRET = (1234).to_bytes(2, "big")


def test_shamir_textbook_polynomial_gives_the_textbook_shares() -> None:
    shares = shamir.split(WIKI_SECRET, range(1, 7), 3, coefficients=[166, 94])
    assert shares == WIKI_SHARES


@pytest.mark.parametrize("subset", list(itertools.combinations(sorted(WIKI_SHARES), 3)))
def test_shamir_any_three_textbook_shares_recover_1234(subset: tuple[int, ...]) -> None:
    picked = {x: WIKI_SHARES[x] for x in subset}
    assert shamir.combine(picked, 3, 2) == WIKI_SECRET


def test_shamir_random_secrets_round_trip_with_any_threshold_subset() -> None:
    rng = random.Random(7)
    xs = list(range(1, 21))
    for threshold in (1, 2, 11, 20):
        secret = rng.randbytes(32)
        shares = shamir.split(secret, xs, threshold)
        assert set(shares) == set(xs)
        for _ in range(5):
            subset = rng.sample(xs, threshold)
            assert shamir.combine({x: shares[x] for x in subset}, threshold, 32) == secret


def test_shamir_combine_uses_the_smallest_indices_only() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, range(1, 21), 11)
    shares[20] = (shares[20] + 1) % shamir.PRIME  # a wrong share beyond the first 11
    assert shamir.combine(shares, 11, 32) == secret
    shares[1] = (shares[1] + 1) % shamir.PRIME  # a wrong share among them
    # its Lagrange weight at 0 is prod(j / (j - 1), j = 2..11) = 11
    off_by_11 = (int.from_bytes(secret, "big") + 11).to_bytes(32, "big")
    assert shamir.combine(shares, 11, 32) == off_by_11
    shares[1] = (shares[1] + 2**400) % shamir.PRIME  # far off: the result no longer fits
    with pytest.raises(ValueError, match="does not fit"):
        shamir.combine(shares, 11, 32)


def test_shamir_too_few_shares_reveal_nothing_useful_and_combine_refuses() -> None:
    secret = b"\x5a" * 32
    shares = shamir.split(secret, range(1, 21), 11)
    ten = {x: shares[x] for x in range(1, 11)}
    with pytest.raises(ValueError, match="need 11 shares, got 10"):
        shamir.combine(ten, 11, 32)
    # interpolating the 10 shares as if the threshold were 10 gives some other value
    assert shamir.combine(ten, 10, 66) != secret.rjust(66, b"\0")


def test_shamir_64_byte_secret_round_trips() -> None:
    secret = b"\xff" * 64
    shares = shamir.split(secret, [3, 9, 27], 2)
    assert shamir.combine({9: shares[9], 27: shares[27]}, 2, 64) == secret


@pytest.mark.parametrize(
    ("secret", "xs", "threshold", "message"),
    [
        (b"", [1, 2], 1, "secret"),
        (b"x" * 65, [1, 2], 1, "secret"),
        (b"x", [1, 1], 1, "distinct"),
        (b"x", [0, 1], 1, "outside"),
        (b"x", [1, shamir.PRIME], 1, "outside"),
        (b"x", [1, 2], 0, "threshold"),
        (b"x", [1, 2], 3, "exceeds"),
        (b"x", [1, True], 1, "int"),
    ],
)
def test_shamir_split_refuses_bad_arguments(
    secret: bytes, xs: list[int], threshold: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        shamir.split(secret, xs, threshold)


def test_shamir_split_refuses_wrong_number_of_coefficients() -> None:
    with pytest.raises(ValueError, match="need 2 coefficients"):
        shamir.split(b"x", [1, 2, 3], 3, coefficients=[1])


def test_shamir_combine_refuses_out_of_field_values() -> None:
    with pytest.raises(ValueError, match="not in 0..P-1"):
        shamir.combine({1: shamir.PRIME}, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        shamir.combine({0: 5}, 1, 1)


@pytest.mark.parametrize("y", [0, 1, 1234, 2**512, shamir.PRIME - 1])
def test_shamir_share_bytes_round_trip(y: int) -> None:
    b = shamir.share_to_bytes(y)
    assert len(b) == shamir.SHARE_BYTES == 66
    assert shamir.share_from_bytes(b) == y


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        bytes(65),
        bytes(67),
        shamir.PRIME.to_bytes(66, "big"),
        b"\xff" * 66,
        "00" * 66,
        None,
        66,
    ],
)
def test_shamir_malformed_share_bytes_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        shamir.share_from_bytes(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- prg

RFC_KEY = bytes(range(32))
SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
SUNSCREEN_CIPHERTEXT = bytes.fromhex(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d"
)
BLOCK_232 = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


def _nonce16(counter: int, rfc_nonce_hex: str) -> bytes:
    return counter.to_bytes(4, "little") + bytes.fromhex(rfc_nonce_hex)


def test_prg_rfc8439_2_4_2_encryption_vector() -> None:
    ks = prg.keystream(RFC_KEY, _nonce16(1, "000000000000004a00000000"), len(SUNSCREEN))
    assert bytes(a ^ b for a, b in zip(ks, SUNSCREEN)) == SUNSCREEN_CIPHERTEXT


def test_prg_rfc8439_2_3_2_block_function_vector() -> None:
    assert prg.keystream(RFC_KEY, _nonce16(1, "000000090000004a00000000"), 64) == BLOCK_232


def test_prg_mask_is_the_zero_nonce_keystream_read_little_endian() -> None:
    seed = bytes(range(100, 132))
    m = prg.mask(seed, 5)
    ks = prg.keystream(seed, bytes(16), 20)
    assert m.tolist() == [int.from_bytes(ks[i : i + 4], "little") for i in range(0, 20, 4)]


def test_prg_mask_is_deterministic_typed_and_a_prefix_of_longer_masks() -> None:
    seed = b"s" * 32
    m = prg.mask(seed, 100_000)
    assert m.dtype == np.uint32 and m.shape == (100_000,)
    assert m.flags.writeable
    assert np.array_equal(m, prg.mask(seed, 100_000))
    assert np.array_equal(m[:1000], prg.mask(seed, 1000))
    assert prg.mask(seed, 0).shape == (0,)


def test_prg_different_seeds_give_different_masks() -> None:
    a = prg.mask(b"a" * 32, 1000)
    b = prg.mask(b"b" * 32, 1000)
    assert np.count_nonzero(a == b) < 5


def test_prg_mask_mean_is_near_half_the_range() -> None:
    m = prg.mask(bytes(32), 1_000_000)
    # std of the mean of 1M uniform words is 2**32 / sqrt(12e6) ~ 1.2e6; allow ~9 sigma
    assert abs(m.mean(dtype=np.float64) - 2**31) < 0.005 * 2**31


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), "x" * 32])
def test_prg_mask_refuses_bad_seeds(seed: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        prg.mask(seed, 10)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keys

ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED_K = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def _hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    # RFC 5869 with hmac from the standard library: no salt means a zero salt of hash length
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_keys_rfc7748_6_1_vector() -> None:
    alice = keys.private_from_bytes(ALICE_PRIVATE)
    bob = keys.private_from_bytes(BOB_PRIVATE)
    assert keys.private_bytes(alice) == ALICE_PRIVATE
    assert alice.public_key().public_bytes_raw() == ALICE_PUBLIC
    assert bob.public_key().public_bytes_raw() == BOB_PUBLIC
    assert alice.exchange(bob.public_key()) == SHARED_K
    # agree() is HKDF-SHA256 of K with the documented info, on both sides
    expected = _hkdf_sha256(SHARED_K, b"fedmq secagg round 1")
    assert keys.agree(alice, BOB_PUBLIC, b"round 1") == expected
    assert keys.agree(bob, ALICE_PUBLIC, b"round 1") == expected


def test_keys_both_sides_agree_and_info_separates_keys() -> None:
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    assert isinstance(a.private, X25519PrivateKey) and len(a.public) == 32
    assert a.private.public_key().public_bytes_raw() == a.public
    k_ab = keys.agree(a.private, b.public, b"mask r3")
    assert len(k_ab) == 32
    assert k_ab == keys.agree(b.private, a.public, b"mask r3")
    assert k_ab != keys.agree(a.private, b.public, b"mask r4")
    assert k_ab != keys.agree(a.private, b.public, b"share r3")


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), bytes(32), "x" * 32])
def test_keys_agree_refuses_malformed_or_low_order_public_keys(bad: object) -> None:
    # bytes(32) is the point of order 1 (u = 0): the exchange gives all zeros
    with pytest.raises(ValueError):
        keys.agree(keys.KeyPair.generate().private, bad, b"i")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), None])
def test_keys_private_from_bytes_refuses_bad_lengths(bad: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keys.private_from_bytes(bad)  # type: ignore[arg-type]


def test_keys_seal_unseal_round_trip() -> None:
    key = bytes(range(32))
    blob = keys.seal(key, b"share payload", b"from a to b r1")
    assert len(blob) == 12 + len(b"share payload") + 16
    assert keys.unseal(key, blob, b"from a to b r1") == b"share payload"
    assert keys.seal(key, b"share payload", b"from a to b r1") != blob  # fresh nonce
    assert keys.unseal(key, keys.seal(key, b"", b""), b"") == b""


def test_keys_unseal_refuses_tampering_wrong_aad_wrong_key_and_short_blobs() -> None:
    key = bytes(range(32))
    blob = keys.seal(key, b"share payload", b"aad")
    for i in (0, 11, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[i] ^= 1
        with pytest.raises(ValueError, match="authentication"):
            keys.unseal(key, bytes(tampered), b"aad")
    with pytest.raises(ValueError, match="authentication"):
        keys.unseal(key, blob, b"other aad")
    with pytest.raises(ValueError, match="authentication"):
        keys.unseal(bytes(32), blob, b"aad")
    for short in (b"", blob[:27]):
        with pytest.raises(ValueError, match="too short"):
            keys.unseal(key, short, b"aad")
    with pytest.raises(ValueError, match="32 bytes"):
        keys.unseal(bytes(31), blob, b"aad")


# --------------------------------------------------------------------------- quantize


def test_quantize_levels_leave_room_for_the_sum() -> None:
    assert quantize.levels_for(1000) * 1000 < 2**32
    assert quantize.levels_for(1) == 2**32 - 1
    with pytest.raises(ValueError):
        quantize.levels_for(0)


def test_quantize_sum_of_1000_vectors_decodes_to_the_float_sum() -> None:
    n, dim, clip = 1000, 200, 0.5
    levels = quantize.levels_for(n)
    rng = np.random.default_rng(1)
    xs = rng.uniform(-clip, clip, size=(n, dim))
    total = np.zeros(dim, dtype=np.uint32)
    exact = np.zeros(dim, dtype=np.int64)
    for x in xs:
        q = quantize.quantize(x, clip, levels, rng)
        assert q.dtype == np.uint32 and q.max() <= levels
        quantize.add_mod(total, q)
        exact += q
    assert np.array_equal(total, exact)  # no wrap-around: mod 2**32 is the integer sum
    decoded = quantize.dequantize_sum(total, n, clip, levels)
    error = np.abs(decoded - xs.sum(axis=0))
    step = 2 * clip / levels
    assert error.max() <= n * step
    # unbiased rounding: errors add like a random walk (~sqrt(n) steps), not n steps
    assert error.mean() < 0.05 * n * step


def test_quantize_stochastic_rounding_is_unbiased() -> None:
    clip, levels = 1.0, 10  # 0.3 sits halfway between the levels for 0.2 and 0.4
    rng = np.random.default_rng(2)
    q = quantize.quantize(np.full(100_000, 0.3), clip, levels, rng)
    assert set(np.unique(q).tolist()) == {6, 7}
    decoded = quantize.dequantize_sum(q, 1, clip, levels)
    assert abs(decoded.mean() - 0.3) < 2e-3  # std of the mean is 3e-4


def test_quantize_clamps_values_beyond_clip_and_refuses_nan() -> None:
    levels = quantize.levels_for(10)
    rng = np.random.default_rng(3)
    x = np.array([-5.0, 5.0, np.inf, -np.inf, -1.0, 1.0])
    assert quantize.quantize(x, 1.0, levels, rng).tolist() == [0, levels, levels, 0, 0, levels]
    with pytest.raises(ValueError, match="NaN"):
        quantize.quantize(np.array([0.0, np.nan]), 1.0, levels, rng)
    with pytest.raises(ValueError, match="clip"):
        quantize.quantize(x, 0.0, levels, rng)


def test_quantize_modular_add_and_sub_wrap_and_cancel_masks() -> None:
    a = np.array([2**32 - 1, 5], dtype=np.uint32)
    out = quantize.add_mod(a, np.array([2, 7], dtype=np.uint32))
    assert out is a and a.tolist() == [1, 12]
    quantize.sub_mod(a, np.array([2, 13], dtype=np.uint32))
    assert a.tolist() == [2**32 - 1, 2**32 - 1]
    q = np.arange(10, dtype=np.uint32)
    m = prg.mask(b"m" * 32, 10)
    masked = quantize.add_mod(q.copy(), m)
    assert np.array_equal(quantize.sub_mod(masked, m), q)
    with pytest.raises(ValueError, match="uint32"):
        quantize.add_mod(a, np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        quantize.add_mod(a, np.zeros(3, dtype=np.uint32))


# --------------------------------------------------------------------------- graph

SEED = bytes(range(32))


def _ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def test_graph_degree_and_threshold_formulas() -> None:
    assert graph.degree_for(1000) == 20
    assert graph.degree_for(100) == 14
    assert graph.degree_for(1024) == 20 and graph.degree_for(1025) == 22
    assert graph.degree_for(5) == 4  # 2 * 3 capped at n - 1
    assert graph.degree_for(2) == 1
    assert graph.degree_for(1) == 0
    assert graph.threshold_for(20) == 11
    assert graph.threshold_for(0) == 1
    with pytest.raises(ValueError):
        graph.degree_for(0)


@pytest.mark.parametrize("n", [5, 20, 100, 1000])
def test_graph_is_symmetric_loop_free_sorted_and_regular(n: int) -> None:
    degree = graph.degree_for(n)
    nb = graph.neighbours(_ids(n), degree, SEED)
    assert list(nb) == sorted(_ids(n))
    for d, peers in nb.items():
        assert d not in peers
        assert list(peers) == sorted(peers)
        assert len(peers) == degree
        for p in peers:
            assert d in nb[p]


def test_graph_odd_degree_with_even_n_adds_the_opposite_node() -> None:
    nb = graph.neighbours(_ids(10), 3, SEED)
    assert all(len(peers) == 3 for peers in nb.values())
    assert all(d in nb[p] for d, peers in nb.items() for p in peers)


def test_graph_is_deterministic_and_depends_on_the_seed() -> None:
    ids = _ids(100)
    a = graph.neighbours(ids, 14, SEED)
    assert a == graph.neighbours(list(reversed(ids)), 14, SEED)
    assert a != graph.neighbours(ids, 14, bytes(32))


def test_graph_is_not_the_sorted_order_ring() -> None:
    ids = _ids(100)
    nb = graph.neighbours(ids, 14, SEED)
    position = {d: i for i, d in enumerate(ids)}
    edges = {(d, p) for d, peers in nb.items() for p in peers if d < p}
    assert len(edges) == 100 * 14 // 2
    adjacent = [e for e in edges if abs(position[e[0]] - position[e[1]]) in (1, 99)]
    assert len(adjacent) < 0.1 * len(edges)


def test_graph_small_n_is_complete() -> None:
    for n in (1, 2, 3, 5):
        nb = graph.neighbours(_ids(n), graph.degree_for(n), SEED)
        for d, peers in nb.items():
            assert set(peers) == set(_ids(n)) - {d}


def test_graph_shuffle_is_near_uniform() -> None:
    counts = Counter(
        tuple(graph.shuffled(["a", "b", "c"], i.to_bytes(32, "big"))) for i in range(600)
    )
    assert len(counts) == 6
    assert all(60 <= c <= 140 for c in counts.values())  # expected 100, std ~9


def test_graph_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        graph.neighbours(_ids(10), 4, bytes(16))
    with pytest.raises(ValueError, match="distinct"):
        graph.neighbours(["a", "a", "b"], 1, SEED)
    with pytest.raises(ValueError, match="degree"):
        graph.neighbours(_ids(10), -1, SEED)


def test_the_degree_grows_until_the_round_survives_its_dropout_bound() -> None:
    """2 ceil(log2 n) neighbours lose ~46 of 1,000 secrets at 30% dropout (t = k/2 + 1);
    sized for the bound, a random 30% drop leaves every secret at least t shares."""
    import random

    assert graph.degree_for(1000, 0.0) == 20
    assert graph.degree_for(1000, 0.3) == 134
    assert graph.degree_for(100, 0.3) == 99  # the complete graph
    assert 1000 * graph.short_of_threshold(134, 0.7) <= graph.ROUND_FAILURE
    assert 1000 * graph.short_of_threshold(20, 0.7) > 40  # the unsized graph's loss
    ids = _ids(1000)
    k = graph.degree_for(1000, 0.3)
    nb = graph.neighbours(ids, k, SEED)
    t = graph.threshold_for(k)
    for trial in range(5):
        dropped = set(random.Random(trial).sample(ids, 300))
        short = [d for d in ids if sum(v not in dropped for v in nb[d]) < t]
        assert not short, (trial, len(short))
    with pytest.raises(ValueError):
        graph.degree_for(10, 0.5)
