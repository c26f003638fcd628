"""Key files -> the sign/verify callables that the agent and the aggregator take."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker import signing
from broker.errors import CodecError

Sign = Callable[[dict, dict], str]
Verify = Callable[[dict, dict], None]


def agent_hooks(
    signing_key: Path | None, model_key: Path | None
) -> tuple[Sign | None, Verify | None]:
    """(sign an update, verify a model) for a device; None where no key is configured."""
    sign = verify = None
    if signing_key:
        private = signing.load_private(signing_key)
        sign = lambda tensors, meta: signing.sign(private, tensors, meta)  # noqa: E731
    if model_key:
        public = signing.load_public(model_key)
        verify = lambda tensors, meta: signing.verify(public, tensors, meta)  # noqa: E731
    return sign, verify


def known_devices(device_keys: Path | None) -> tuple[str, ...]:
    """The device ids with a public key in ``device_keys`` (``<id>.pub``)."""
    if not device_keys:
        return ()
    return tuple(sorted(p.stem for p in Path(device_keys).glob("*.pub")))


def aggregator_hooks(
    signing_key: Path | None, device_keys: Path | None
) -> tuple[Sign | None, Callable[[str, dict, dict], None] | None]:
    """(sign a model, verify a device's update); a device's key file is checked for every
    update (``DeviceKeys``), so a device provisioned while the aggregator runs is accepted
    and a removed one refused."""
    sign_model = verify_update = None
    if signing_key:
        private = signing.load_private(signing_key)
        sign_model = lambda tensors, meta: signing.sign(private, tensors, meta)  # noqa: E731
    if device_keys:
        keys = DeviceKeys(Path(device_keys))

        def verify_update(device_id: str, tensors: dict, meta: dict) -> None:
            signing.verify(keys.public(device_id), tensors, meta)

    return sign_model, verify_update


class DeviceKeys:
    """Devices' public keys, parsed once and re-read only when their file changes.

    Every lookup stats the key file (a few microseconds) and reuses the parsed key while
    its (device, inode, size, mtime) is unchanged: a device removed with ``fedmq broker
    remove-device`` is refused from its next update on, and one provisioned again gets
    its new key, without parsing PEM for every update."""

    MAX_CACHED = 100_000  # keys kept; past this the cache starts over (bounded memory)

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, tuple[tuple[int, int, int, int], Ed25519PublicKey]] = {}

    def public(self, device_id: str) -> Ed25519PublicKey:
        path = self.directory / f"{device_id}.pub"
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # gone, or a name no file can have
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self._cache.pop(device_id, None)
            raise CodecError(f"no public key for device {device_id!r}", reason="unknown_device")
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(device_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = signing.load_public(path)
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[device_id] = (stamp, key)
        return key


def agent_identity(
    signing_key: Path | None, registry_key: Path | None, identity_cert: str | None
):  # -> device_agent.secure_client.Identity | None
    """What a device shows and checks in secure aggregation: its key, the registry's
    certificate of it and the registry's key; None when the credentials lack them."""
    if not (signing_key and registry_key and identity_cert):
        return None
    import base64
    import binascii

    from broker import identity
    from broker.errors import ConfigError
    from device_agent.secure_client import Identity

    try:
        cert = base64.b64decode(identity_cert, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("identity_cert is not base64") from None
    public = signing.load_private(signing_key).public_key()
    return Identity(identity.raw_public(public), cert, signing.load_public(registry_key))
