"""The aggregator's device-key cache: parsed once, yet a removed device is refused at once."""

from __future__ import annotations

import pytest
import torch

from broker import signing
from broker.errors import CodecError
from fedmq.signing_hooks import DeviceKeys, aggregator_hooks


def _signed(private, value: float) -> tuple[dict, dict]:
    tensors = {"w": torch.full((3,), value)}
    meta = {"round": "1", "device_id": "d1"}
    meta["signature"] = signing.sign(private, tensors, meta)
    return tensors, meta


def test_key_parsed_once_then_refused_once_removed(tmp_path, monkeypatch):
    (tmp_path / "keys").mkdir()
    private = signing.generate_keypair(tmp_path / "d1.key", tmp_path / "keys" / "d1.pub")
    loads = []
    real = signing.load_public
    monkeypatch.setattr(signing, "load_public", lambda p: loads.append(p) or real(p))
    _, verify = aggregator_hooks(None, tmp_path / "keys")
    for i in range(5):
        verify("d1", *_signed(private, float(i)))
    assert len(loads) == 1  # parsed once for five updates
    (tmp_path / "keys" / "d1.pub").unlink()  # what `fedmq broker remove-device` does
    with pytest.raises(CodecError) as exc:
        verify("d1", *_signed(private, 9.0))
    assert exc.value.reason == "unknown_device"


def test_a_replaced_key_is_read_again(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    old = signing.generate_keypair(tmp_path / "old.key", keys / "d1.pub")
    cache = DeviceKeys(keys)
    signing.verify(cache.public("d1"), *_signed(old, 1.0))
    new = signing.generate_keypair(tmp_path / "new.key", tmp_path / "new.pub")
    (tmp_path / "new.pub").replace(keys / "d1.pub")  # provisioned again: a new file
    signing.verify(cache.public("d1"), *_signed(new, 1.0))
    with pytest.raises(CodecError) as exc:
        signing.verify(cache.public("d1"), *_signed(old, 1.0))
    assert exc.value.reason == "bad_signature"


def test_unknown_and_odd_names_are_unknown_devices(tmp_path):
    (tmp_path / "dir.pub").mkdir()
    cache = DeviceKeys(tmp_path)
    for name in ("nobody", "dir", "nul\x00byte"):
        with pytest.raises(CodecError) as exc:
            cache.public(name)
        assert exc.value.reason == "unknown_device"


def test_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(DeviceKeys, "MAX_CACHED", 3)
    for i in range(5):
        signing.generate_keypair(tmp_path / f"k{i}", tmp_path / f"d{i}.pub")
    cache = DeviceKeys(tmp_path)
    for i in range(5):
        cache.public(f"d{i}")
    assert len(cache._cache) <= 3
