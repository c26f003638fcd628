"""Key files -> the sign/verify callables that the agent and the aggregator take."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def aggregator_hooks(
    signing_key: Path | None, device_keys: Path | None
) -> tuple[Sign | None, Callable[[str, dict, dict], None] | None]:
    """(sign a model, verify a device's update); the device keys are read per update, so a
    device provisioned while the aggregator runs is accepted and a removed one refused."""
    sign_model = verify_update = None
    if signing_key:
        private = signing.load_private(signing_key)
        sign_model = lambda tensors, meta: signing.sign(private, tensors, meta)  # noqa: E731
    if device_keys:
        keys_dir = Path(device_keys)

        def verify_update(device_id: str, tensors: dict, meta: dict) -> None:
            key_path = keys_dir / f"{device_id}.pub"
            if not key_path.is_file():
                raise CodecError(f"no public key for device {device_id!r}", reason="unknown_device")
            signing.verify(signing.load_public(key_path), tensors, meta)

    return sign_model, verify_update


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
