"""Compressed updates (broker/compression.py): round trips with their error bounds, the
[compression] table's refusals, and the aggregator's decoder under hostile payloads."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from broker import codec, compression, messages
from broker.compression_settings import Compression, parse
from broker.errors import CodecError, TaskError
from broker.task import TaskSpec
from fedmq.synthetic import BLOBS_TASK


def model() -> dict[str, torch.Tensor]:
    """A small model with a matrix, a 3-d kernel, vectors, a scalar counter and an empty
    tensor: every case the layout has."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 5, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": torch.randn(6, 8, generator=g),
        "fc.bias": torch.randn(6, generator=g),
        "empty": torch.zeros(0),
    }


def trained_from(base, scale=0.01, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + 3
        for k, v in base.items()
    }


def maxabs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def delta_of(trained, base):
    return {k: trained[k].double() - base[k].double() for k in base if base[k].is_floating_point()}


FP16 = Compression("fp16")
INT8 = Compression("int8")
INT8_CHANNEL = Compression("int8", per_channel=True)
TOPK = Compression("topk", fraction=0.1)
ALL = [FP16, INT8, INT8_CHANNEL, TOPK]


def payload(wire, settings, **meta_changes):
    meta = messages.update_metadata(
        round_=1,
        device_id="dev",
        num_samples=5,
        base_hash="ab" * 32,
        metrics={"train_loss": 1.0},
        encoding=settings.label,
    )
    meta.update(meta_changes)
    return codec.encode(wire, meta)


# -- round trips ------------------------------------------------------------------------


def test_fp16_keeps_every_coordinate_of_the_delta_to_half_precision():
    base = model()
    trained = trained_from(base)
    wire, residual = compression.encode(trained, base, FP16)
    assert residual is None and wire["delta"].dtype == torch.float16
    got = delta_of(compression.decode(wire, FP16, base), base)
    want = delta_of(trained, base)
    for name in want:
        # float32 base + fp16 delta: the delta's relative error <= 2^-11, plus float32's own
        bound = want[name].abs() * 2**-11 + base[name].double().abs() * 2**-23 + 1e-12
        assert bool(((got[name] - want[name]).abs() <= bound * 1.01).all()), name


@pytest.mark.parametrize("settings", [INT8, INT8_CHANNEL], ids=["tensor", "channel"])
def test_int8_rounds_within_one_step_and_is_unbiased(settings):
    base = model()
    trained = trained_from(base)
    want = delta_of(trained, base)
    wire, _ = compression.encode(trained, base, settings, generator=torch.Generator())
    layout = compression.Layout.of(codec.schema_of(base))
    assert wire["delta"].dtype == torch.int8
    assert wire["scale"].shape == (len(layout.groups(settings.per_channel)),)
    assert int(wire["delta"].abs().max()) <= 127
    step = float(wire["scale"].max())
    one = delta_of(compression.decode(wire, settings, base), base)
    for name in want:
        assert maxabs(one[name] - want[name]) <= step * 1.0001 + 1e-6
    # stochastic rounding: the mean of many roundings converges on the true delta
    trials = 2000
    x = compression.flat_delta(trained, base, layout)
    sizes = layout.groups(settings.per_channel)
    q, scale = compression.quantize_int8(x.repeat(trials), sizes * trials, torch.Generator())
    decoded = q.double() * torch.repeat_interleave(scale.double(), torch.tensor(sizes * trials))
    error = (decoded.reshape(trials, -1).mean(0) - x.double()).abs()
    # each coordinate's rounding error has std <= step / 2: 5 sigma of the mean
    assert float(error.max()) <= 5 * step / (2 * math.sqrt(trials))
    assert float(error.max()) > 0  # and it is rounding, not exact


def test_int8_per_channel_gives_each_row_its_own_scale():
    base = {"w": torch.zeros(2, 4)}
    trained = {"w": torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.01, 0.02, -0.03, 0.0]])}
    wire, _ = compression.encode(trained, base, INT8_CHANNEL, generator=torch.Generator())
    assert wire["scale"].tolist() == pytest.approx([2.0 / 127, 0.03 / 127])
    got = compression.decode(wire, INT8_CHANNEL, base)["w"]
    assert float((got[1] - trained["w"][1]).abs().max()) <= 0.03 / 127 + 1e-9  # not 2/127


def test_topk_keeps_each_tensors_k_largest_and_feeds_the_rest_back():
    base = model()
    trained = trained_from(base)
    want = delta_of(trained, base)
    wire, residual = compression.encode(trained, base, TOPK)
    layout = compression.Layout.of(codec.schema_of(base))
    counts = layout.topk_counts(0.1)
    assert wire["index"].shape == (sum(counts),) and residual.shape == (layout.size,)
    got = delta_of(compression.decode(wire, TOPK, base), base)
    for (name, shape, _, numel), k in zip(layout.floats, counts):
        if len(shape) < 2:  # biases, normalization weights and statistics: whole, exact
            assert k == 0 and torch.allclose(got[name], want[name], atol=1e-6), name
            continue
        kept = got[name].reshape(-1) != 0
        assert int(kept.sum()) == k == min(numel, math.ceil(0.1 * numel))
        if k:
            smallest_kept = float(want[name].reshape(-1)[kept].abs().min())
            largest_dropped = maxabs(want[name].reshape(-1)[~kept])
            assert smallest_kept >= largest_dropped
    # sent + residual is the whole delta: nothing is lost, only postponed
    flat = compression.flat_delta(compression.decode(wire, TOPK, base), base, layout)
    whole = compression.flat_delta(trained, base, layout)
    assert torch.allclose(flat + residual, whole, atol=1e-6)


def test_topk_error_feedback_sends_every_coordinate_in_time():
    base = {"w": torch.zeros(10, 10)}
    trained = {"w": torch.linspace(0.5, 1.0, 100).reshape(10, 10)}  # the same every round
    settings = Compression("topk", fraction=0.1)
    residual, sent = None, torch.zeros(100)
    for _ in range(60):
        wire, residual = compression.encode(trained, base, settings, residual=residual)
        assert wire["index"].shape == (10,) and "dense" not in wire
        sent += compression.decode(wire, settings, base)["w"].reshape(-1)
    # conservation: sent + residual = 60 rounds of delta
    assert torch.allclose(sent + residual, 60 * trained["w"].reshape(-1), rtol=1e-5)
    # 10 of 100 a round, yet every coordinate, the smallest included, built up in the
    # residual until it was sent; and none is held back for long
    assert bool((sent > 0).all())
    assert float(residual.abs().max()) < 15 * float(trained["w"].max())


@pytest.mark.parametrize("settings", ALL, ids=lambda s: s.label)
def test_integer_buffers_travel_exactly(settings):
    base = model()
    trained = trained_from(base)
    wire, _ = compression.encode(trained, base, settings, generator=torch.Generator())
    decoded = compression.decode(wire, settings, base)
    assert decoded["bn.num_batches_tracked"].dtype == torch.int64
    assert int(decoded["bn.num_batches_tracked"]) == 10
    assert {k: v.shape for k, v in decoded.items()} == {k: v.shape for k, v in base.items()}


@pytest.mark.parametrize("settings", ALL, ids=lambda s: s.label)
def test_an_encoded_update_decodes_through_the_codec_and_is_smaller(settings):
    base = model()
    trained = trained_from(base)
    wire, _ = compression.encode(trained, base, settings, generator=torch.Generator())
    update = messages.decode_update(
        payload(wire, settings), schema=codec.schema_of(base), compression=settings
    )
    assert update.encoding == settings.label
    assert len(payload(wire, settings)) < len(payload(trained, Compression()))


# -- the [compression] table -------------------------------------------------------------


@pytest.mark.parametrize(
    "table, label",
    [
        ({"encoding": "fp16"}, "fp16"),
        ({"encoding": "int8"}, "int8/tensor"),
        ({"encoding": "int8", "per_channel": True}, "int8/channel"),
        ({"encoding": "topk", "fraction": 0.05}, "topk/0.05"),
        ({"encoding": "none"}, ""),
        ({}, ""),
    ],
)
def test_the_table_gives_the_label_an_update_must_carry(table, label):
    assert parse(table).label == label


@pytest.mark.parametrize(
    "table, message",
    [
        ({"encoding": "zip"}, "encoding must be one of"),
        ({"per_channel": True}, "encoding must be one of"),
        ({"encoding": "topk", "fraction": 0}, "fraction must be a number in (0, 1]"),
        ({"encoding": "topk", "fraction": 1.5}, "fraction must be a number in (0, 1]"),
        ({"encoding": "topk", "fraction": "half"}, "fraction must be a number"),
        ({"encoding": "int8", "per_channel": "yes"}, "per_channel must be true or false"),
        ({"encoding": "topk", "per_channel": True}, "per_channel does not apply to encoding"),
        ({"encoding": "fp16", "fraction": 0.1}, "fraction does not apply to encoding 'fp16'"),
        ({"encoding": "int8", "bits": 4}, "unknown [compression] key(s): bits"),
    ],
)
def test_a_bad_table_is_refused_naming_the_key(table, message):
    with pytest.raises(TaskError) as err:
        parse(table)
    assert message in str(err.value)


def test_the_task_checks_its_table_and_refuses_it_with_secure_aggregation(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(BLOBS_TASK + '[compression]\nencoding = "topk"\nfraction = 2.0\n')
    with pytest.raises(TaskError, match=r"task.toml: \[compression\] fraction"):
        TaskSpec.load(path)
    path.write_text(BLOBS_TASK + '[compression]\nencoding = "int8"\n[secure_aggregation]\n')
    with pytest.raises(TaskError, match="cannot be combined with \\[secure_aggregation\\]"):
        TaskSpec.load(path)
    path.write_text(
        BLOBS_TASK + '[compression]\nencoding = "int8"\n[secure_aggregation]\nenabled = false\n'
    )
    spec = TaskSpec.load(path)
    assert spec.compression == {"encoding": "int8"}
    again = TaskSpec.from_json(spec.to_json())  # travels to the devices in the model
    assert again.compression == {"encoding": "int8"} and again == spec


def test_a_task_without_the_table_hashes_as_before(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(BLOBS_TASK)
    assert "compression" not in json.loads(TaskSpec.load(path).to_json())


# -- the aggregator's decoder under hostile payloads ---------------------------------------


def refused(data: bytes, settings: Compression, schema) -> str:
    with pytest.raises(CodecError) as err:
        messages.decode_update(data, schema=schema, compression=settings)
    return err.value.reason


def test_an_update_must_carry_the_tasks_encoding():
    base = model()
    schema = codec.schema_of(base)
    trained = trained_from(base)
    plain = payload(trained, Compression())
    assert refused(plain, INT8, schema) == "bad_metadata"  # plain weights to an int8 task
    wire, _ = compression.encode(trained, base, INT8, generator=torch.Generator())
    assert refused(payload(wire, INT8), Compression(), schema) == "bad_metadata"
    assert refused(payload(wire, INT8), INT8_CHANNEL, schema) == "bad_metadata"
    # the right label on the wrong tensors: the schema the label implies refuses them
    relabelled = payload(wire, INT8, encoding="int8/channel")
    assert refused(relabelled, INT8_CHANNEL, schema) == "shape_mismatch"
    wire, _ = compression.encode(trained, base, TOPK)
    other = Compression("topk", fraction=0.2)
    assert refused(payload(wire, other), other, schema) == "shape_mismatch"


def test_hostile_compressed_contents_are_refused_with_a_reason():
    base = model()
    schema = codec.schema_of(base)
    trained = trained_from(base)
    wire, _ = compression.encode(trained, base, INT8, generator=torch.Generator())

    def with_(settings, **tensors):
        return payload({**wire_of[settings.encoding], **tensors}, settings)

    wire_of = {
        "int8": wire,
        "topk": compression.encode(trained, base, TOPK)[0],
        "fp16": compression.encode(trained, base, FP16)[0],
    }
    scale = wire["scale"].clone()
    scale[0] = -1.0
    assert refused(with_(INT8, scale=scale), INT8, schema) == "bad_metadata"
    scale[0] = 3e38
    assert refused(with_(INT8, scale=scale), INT8, schema) == "bad_metadata"
    scale[0] = float("nan")
    assert refused(with_(INT8, scale=scale), INT8, schema) == "non_finite"
    index = wire_of["topk"]["index"].clone()
    index[-1] = 10**6
    assert refused(with_(TOPK, index=index), TOPK, schema) == "bad_metadata"
    index[-1] = -1
    assert refused(with_(TOPK, index=index), TOPK, schema) == "bad_metadata"
    index = wire_of["topk"]["index"].flip(0).contiguous()
    assert refused(with_(TOPK, index=index), TOPK, schema) == "bad_metadata"  # unsorted
    index = wire_of["topk"]["index"].clone()
    index[1] = index[0]
    assert refused(with_(TOPK, index=index), TOPK, schema) == "bad_metadata"  # duplicate
    # sorted and in range, but all from the first tensor: not k per tensor
    index = torch.arange(len(index), dtype=torch.int32)
    assert refused(with_(TOPK, index=index), TOPK, schema) == "bad_metadata"
    value = wire_of["topk"]["value"].clone()
    value[0] = float("inf")
    assert refused(with_(TOPK, value=value), TOPK, schema) == "non_finite"
    delta = wire_of["fp16"]["delta"].clone()
    delta[0] = float("nan")
    assert refused(with_(FP16, delta=delta), FP16, schema) == "non_finite"
    assert refused(with_(FP16, delta=delta.float()), FP16, schema) == "dtype_mismatch"
    counters = torch.zeros(2, dtype=torch.int64)
    assert refused(with_(FP16, counters=counters), FP16, schema) == "shape_mismatch"
    extra = {"index": wire_of["topk"]["index"]}
    assert refused(with_(FP16, **extra), FP16, schema) == "unknown_tensor"


def test_a_finite_delta_that_overflows_its_base_is_refused_by_finite():
    base = {"w": torch.full((4,), 3e38)}
    wire = {"delta": torch.full((4,), 100, dtype=torch.int8), "scale": torch.tensor([1e37])}
    with pytest.raises(CodecError) as err:
        compression.finite(compression.decode(wire, INT8, base))
    assert err.value.reason == "non_finite"


@pytest.mark.parametrize("settings", ALL, ids=lambda s: s.label)
def test_fuzzed_compressed_payloads_only_ever_raise_codec_errors(settings):
    """Byte flips, truncations and tensor swaps of valid payloads: each is refused with a
    CodecError or decodes into an update whose full weights have the model's shapes."""
    base = model()
    schema = codec.schema_of(base)
    rng = random.Random(f"fuzz-{settings.label}")
    wire, _ = compression.encode(trained_from(base), base, settings, generator=torch.Generator())
    good = payload(wire, settings)
    outcomes = {"refused": 0, "decoded": 0}
    for case in range(400):
        data = bytearray(good)
        kind = case % 4
        if kind == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # flip bytes in the data section only (header stays valid)
            start = 8 + int.from_bytes(data[:8], "little")
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(start, len(data))] = rng.randrange(256)
        elif kind == 2:  # truncate or extend
            data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + b"\0" * 4
        else:  # random values of the right shapes and dtypes
            tensors = {}
            for name, t in wire.items():
                if t.is_floating_point():
                    tensors[name] = (torch.randn(t.shape) * 10.0 ** rng.randint(-3, 40)).to(t.dtype)
                else:
                    high = {torch.int8: 127, torch.int32: 2000}.get(t.dtype, 5)
                    tensors[name] = torch.randint(-high, high, t.shape).to(t.dtype)
            data = bytearray(payload(tensors, settings))
        try:
            update = messages.decode_update(bytes(data), schema=schema, compression=settings)
        except CodecError as exc:
            assert exc.reason in codec.REASONS
            outcomes["refused"] += 1
            continue
        weights = compression.decode(update.tensors, settings, base)
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}
        try:
            compression.finite(weights)
        except CodecError as exc:
            assert exc.reason == "non_finite"
        outcomes["decoded"] += 1
    assert outcomes["refused"] > 100


# -- the demo's task and flags -------------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [{"encoding": "int8", "per_channel": True}, {"encoding": "topk", "fraction": 0.05}],
)
def test_the_demo_writes_its_compression_table_into_the_task(tmp_path, table):
    from fedmq.demo import watch_data

    path = tmp_path / "task.toml"
    path.write_text(watch_data.task_toml(watch_data.demo_task(0, compression=table)))
    assert TaskSpec.load(path).compression == table


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topk-fraction", "0.1"], "--topk-fraction needs --compression topk"),
        (["--compression", "int8", "--secure-aggregation"], "do not combine"),
        (["--compression", "zip"], "Invalid value for '--compression'"),
    ],
)
def test_demo_refuses_compression_flags_that_do_not_fit(flags, message):
    from click.testing import CliRunner

    from fedmq.cli import main

    result = CliRunner().invoke(main, ["demo", *flags])
    assert result.exit_code == 2 and message in result.output


def test_demo_flags_give_the_table():
    from fedmq.cli import compression_table

    assert compression_table(None, None) is None
    assert compression_table("topk", None) == {"encoding": "topk", "fraction": 0.01}
    assert compression_table("int8-channel", None) == {"encoding": "int8", "per_channel": True}
    assert compression_table("fp16", None) == {"encoding": "fp16"}


# -- scripts/compression_table.py ---------------------------------------------------------


def _table_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "compression_table.py"
    spec = importlib.util.spec_from_file_location("compression_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tables_wire_decodes_what_it_sends_and_counts_its_bytes():
    script = _table_script()
    base = model()
    trained = trained_from(base)
    plain, int8 = script.Wire({}, 0), script.Wire({"encoding": "int8"}, 0)
    assert plain("dev", 1, base, trained) is not trained
    got = int8("dev", 1, base, trained)
    for name in base:
        assert maxabs(got[name].double() - trained[name].double()) < 1e-3
    floats = sum(v.numel() for v in base.values() if v.is_floating_point())
    assert plain.sizes[0] - int8.sizes[0] > 2 * floats  # 3 of every 4 bytes, less framing
    rows = {"float32": [(1000.0, 0.9, 1.0)], "int8": [(250.0, 0.895, 1.0)]}
    text = script.table(rows)
    assert "| int8 | 250 | 0.250 | 89.5% | -0.5 pts, -0.5 | 1 |" in text
