"""Pure cryptographic primitives for SecAgg+ (Bell et al. 2020), shared by devices and aggregator.

- ``shamir``: Shamir secret sharing over GF(2**521 - 1), for the mask seeds and key shares;
- ``prg``: ChaCha20 keystreams and the uint32 masks expanded from a seed;
- ``keys``: X25519 key agreement (HKDF-SHA256) and ChaCha20-Poly1305 sealing of shares;
- ``quantize``: fixed-point encoding so that a sum of n updates fits uint32 without wrapping;
- ``graph``: the random Harary graph that tells each device which peers it masks with.

No I/O and no MQTT here: the protocol lives on top of these functions.
"""
