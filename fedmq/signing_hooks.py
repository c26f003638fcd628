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
