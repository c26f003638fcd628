"""A site's partial result on the wire (pure): what it carries, what it is bound to, and
which root tasks a site refuses to fold."""

from __future__ import annotations

import json

import pytest
import torch

from aggregator.upstream import check_site_task, partial_update
from broker import codec, messages, signing
from broker.errors import CodecError, ConfigError
from broker.task import TaskSpec
from tests.helpers import blobs_task


def _root_model(tmp_path):
    task = TaskSpec.load(blobs_task(tmp_path))
    weights = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    payload, _ = messages.encode_model(weights, 4, task, federation="root", run_id="r1")
    return messages.decode_model(payload), task


def test_a_partial_is_a_signed_update_of_the_site_bound_to_the_root_run(tmp_path):
    root, _ = _root_model(tmp_path)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    mean = {"w": torch.full((2, 3), 0.5), "b": torch.ones(3)}
    payload = partial_update(
        mean, root=root, site="site-a", samples=70, devices=2,
        metrics={"train_loss": 0.25}, site_federation="farm-a", sign_key=key,
    )  # fmt: skip
    update = messages.decode_update(payload, schema=codec.schema_of(root.tensors))
    assert (update.device_id, update.round, update.num_samples) == ("site-a", 4, 70)
    assert (update.federation, update.run_id, update.base_hash) == ("root", "r1", root.model_hash)
    assert messages.parse_partial(update.metadata) == 2
    signing.verify(key.public_key(), update.tensors, update.metadata)
    assert torch.equal(update.tensors["w"], mean["w"])
    # the device count is signed: changing it breaks the signature
    forged = dict(update.metadata, partial=json.dumps({"devices": 900}))
    with pytest.raises(CodecError):
        signing.verify(key.public_key(), update.tensors, forged)
    # the same result gives the same content and signature (safetensors may order the
    # metadata differently): a site that replays a round sends the root a duplicate
    again = partial_update(
        mean, root=root, site="site-a", samples=70, devices=2,
        metrics={"train_loss": 0.25}, site_federation="farm-a", sign_key=key,
    )  # fmt: skip
    replayed = messages.decode_update(again)
    assert replayed.metadata == update.metadata
    assert all(torch.equal(replayed.tensors[k], update.tensors[k]) for k in mean)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ('{"devices": 3}', 3),
        ('{"devices": 0}', None),
        ('{"devices": -1}', None),
        ('{"devices": true}', None),
        ('{"devices": 2.5}', None),
        ('{"devices": "2"}', None),
        ("[1]", None),
        ("not json", None),
        ('{"devices": 1' + "0" * 400 + "}", None),
        ("[" * 5000, None),
    ],
)
def test_parse_partial_takes_only_a_positive_count(value, expected):
    meta = {} if value is None else {"partial": value}
    assert messages.parse_partial(meta) == expected


@pytest.mark.parametrize(
    "table, value, message",
    [
        ("strategy", {"name": "krum", "f": 1}, "plain fedavg"),
        ("strategy", {"name": "fedavg", "clip_norm": 1.0}, "plain fedavg"),
        ("secure_aggregation", {"max_dropout": 0.3}, "secure_aggregation"),
        ("compression", {"scheme": "int8"}, "compression"),
        ("privacy", {"noise_multiplier": 1.0}, "privacy"),
    ],
)
def test_a_site_refuses_a_root_task_it_cannot_fold_exactly(tmp_path, table, value, message):
    task = TaskSpec.load(blobs_task(tmp_path))
    check_site_task(task)  # plain fedavg: fine
    check_site_task(TaskSpec(**{**task.__dict__, "strategy": {"name": "fedavg"}}))
    with pytest.raises(ConfigError, match=message):
        check_site_task(TaskSpec(**{**task.__dict__, table: value}))
