"""Sample-weighted FedAvg folded one update at a time, checked against numbers worked by hand."""

from __future__ import annotations

import gc
import random
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from aggregator.allocator import fix_mmap_threshold
from aggregator.fedavg import FoldedSum, WeightedMetrics, fedavg


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_weights_one_and_three_by_hand():
    a = {"w": t([[1.0, 2.0], [0.0, -4.0]]), "b": t([10.0])}
    b = {"w": t([[5.0, 10.0], [4.0, 0.0]]), "b": t([2.0])}
    folded = FoldedSum(a)
    folded.fold(a, 1)
    folded.fold(b, 3)
    assert (folded.total_weight, folded.count) == (4, 2)
    avg = folded.average()
    # w: (1*1 + 3*5)/4 = 4, (2 + 30)/4 = 8, (0 + 12)/4 = 3, (-4 + 0)/4 = -1;  b: (10 + 6)/4 = 4
    assert torch.equal(avg["w"], t([[4.0, 8.0], [3.0, -1.0]]))
    assert torch.equal(avg["b"], t([4.0]))
    assert avg["w"].dtype == torch.float32


def test_three_devices_by_hand_and_equal_weights_is_the_plain_mean():
    ups = [({"x": t([0.0])}, 2), ({"x": t([3.0])}, 5), ({"x": t([9.0])}, 3)]
    # (0*2 + 3*5 + 9*3) / 10 = 42 / 10
    assert torch.equal(fedavg(ups)["x"], t([4.2]))
    assert torch.equal(fedavg([({"x": t([1.0])}, 7), ({"x": t([2.0])}, 7)])["x"], t([1.5]))


def test_the_template_values_are_not_counted():
    template = {"w": t([100.0])}
    folded = FoldedSum(template)
    folded.fold({"w": t([2.0])}, 1)
    assert torch.equal(folded.average()["w"], t([2.0]))


@pytest.mark.parametrize(
    ("dtype", "values", "weights", "expected"),
    [
        (torch.int64, [10, 13], [1, 3], 12),  # 49/4 = 12.25 -> 12
        (torch.int64, [1, 2], [1, 3], 2),  # 7/4 = 1.75 -> 2
        (torch.int32, [-3, 4], [3, 1], -1),  # -5/4 = -1.25 -> -1
        (torch.uint8, [200, 255], [1, 1], 228),  # 227.5 -> 228 (half to even)
        (torch.int16, [0, 1], [2, 1], 0),  # 1/3 -> 0
    ],
)
def test_integer_buffers_keep_their_dtype_and_are_rounded(dtype, values, weights, expected):
    ups = [({"n": torch.tensor(v, dtype=dtype)}, w) for v, w in zip(values, weights)]
    out = fedavg(ups)["n"]
    assert out.dtype == dtype
    assert out.shape == ()
    assert int(out) == expected


def test_batchnorm_state_dict_keeps_num_batches_tracked_int64():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(2)]
    models[0][1].num_batches_tracked.fill_(4)
    models[1][1].num_batches_tracked.fill_(8)
    avg = fedavg([(models[0].state_dict(), 1), (models[1].state_dict(), 1)])
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    assert int(avg["1.num_batches_tracked"]) == 6
    nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).load_state_dict(avg)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [([1, 3], [True, False, False]), ([3, 1], [True, True, True]), ([1, 1], [True, True, True])],
)
def test_bool_buffers_are_a_weighted_majority(weights, expected):
    a = {"m": torch.tensor([True, True, True])}
    b = {"m": torch.tensor([True, False, False])}
    out = fedavg([(a, weights[0]), (b, weights[1])])["m"]
    # [1, 1/4 or 3/4 or 1/2, ...]: >= 0.5 is True (a tie counts as True)
    assert out.dtype == torch.bool
    assert out.tolist() == expected


def test_low_precision_floats_keep_their_dtype():
    ups = [
        (
            {
                "h": t([1.0], torch.float16),
                "b": t([2.0], torch.bfloat16),
                "d": t([1.0], torch.float64),
            },
            1,
        ),
        (
            {
                "h": t([2.0], torch.float16),
                "b": t([4.0], torch.bfloat16),
                "d": t([2.0], torch.float64),
            },
            1,
        ),
    ]
    out = fedavg(ups)
    assert (out["h"].dtype, out["b"].dtype, out["d"].dtype) == (
        torch.float16,
        torch.bfloat16,
        torch.float64,
    )
    assert out["h"].item() == 1.5 and out["b"].item() == 3.0 and out["d"].item() == 1.5


def _random_updates(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shapes = {"conv.weight": (8, 3, 5), "conv.bias": (8,), "fc.weight": (4, 8), "fc.bias": (4,)}
    updates = []
    for _ in range(n):
        scale = 10.0 ** rng.randint(-3, 2)  # devices whose weights differ in magnitude
        tensors = {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}
        tensors["bn.num_batches_tracked"] = torch.tensor(rng.randint(0, 1000))
        tensors["mask"] = torch.rand(6, generator=gen) > 0.5
        updates.append((tensors, rng.randint(1, 5000)))
    return updates


def test_folding_order_does_not_change_a_single_bit():
    updates = _random_updates(20, seed=3)
    reference = fedavg(updates)
    rng = random.Random(11)
    for _ in range(10):
        shuffled = updates[:]
        rng.shuffle(shuffled)
        result = fedavg(shuffled)
        assert result.keys() == reference.keys()
        for name in reference:
            assert result[name].dtype == reference[name].dtype
            assert torch.equal(result[name], reference[name]), name


def test_matches_the_textbook_weighted_mean():
    updates = _random_updates(20, seed=5)
    out = fedavg(updates)
    total = sum(w for _, w in updates)
    for name in ("conv.weight", "fc.bias"):
        expected = sum(u[name].double() * w for u, w in updates) / total
        torch.testing.assert_close(out[name], expected.float(), rtol=0, atol=0)


def test_the_sum_holds_exactly_one_float64_copy_whatever_the_number_of_devices():
    updates = _random_updates(20, seed=7)
    template = updates[0][0]
    folded = FoldedSum(template)
    expected_bytes = 8 * sum(x.numel() for x in template.values())

    def held() -> tuple[int, int]:
        tensors = [v for v in vars(folded).values() if isinstance(v, torch.Tensor)]
        for value in vars(folded).values():
            if isinstance(value, dict):
                tensors += [v for v in value.values() if isinstance(v, torch.Tensor)]
        assert all(x.dtype == torch.float64 for x in tensors)
        return len(tensors), sum(x.numel() * x.element_size() for x in tensors)

    assert held() == (len(template), expected_bytes)
    refs = []
    for tensors, weight in updates:
        folded.fold(tensors, weight)
        refs += [weakref.ref(x) for x in tensors.values()]
    assert held() == (len(template), expected_bytes)
    del updates, template, tensors
    gc.collect()
    assert all(r() is None for r in refs), "FoldedSum kept a reference to a folded update"


def test_refusals():
    folded = FoldedSum({"w": t([1.0])})
    with pytest.raises(ValueError, match="nothing folded"):
        folded.average()
    with pytest.raises(ValueError, match="positive"):
        folded.fold({"w": t([1.0])}, 0)
    with pytest.raises(ValueError, match="tensors"):
        folded.fold({"w": t([1.0]), "extra": t([1.0])}, 1)
    with pytest.raises(ValueError, match="tensors"):
        folded.fold({}, 1)
    assert (folded.total_weight, folded.count) == (0, 0)  # refusals leave no trace
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])


def test_weighted_metrics_by_hand():
    m = WeightedMetrics()
    m.fold({"train_loss": 1.0, "eval_accuracy": 0.5}, 1)
    m.fold({"train_loss": 3.0}, 3)
    m.fold({"eval_accuracy": 1.0, "eval_loss": 2}, 1)
    means = m.means()
    # train_loss (1*1 + 3*3)/4; eval_accuracy (0.5 + 1)/2 (only devices that reported it)
    assert means == {"eval_accuracy": 0.75, "eval_loss": 2.0, "train_loss": 2.5}
    assert list(means) == sorted(means)
    assert WeightedMetrics().means() == {}


def test_fold_refuses_a_broadcastable_shape():
    folded = FoldedSum({"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError):
        folded.fold({"w": torch.ones(3)}, 1)


def test_a_failed_fold_leaves_the_sum_untouched():
    folded = FoldedSum({"a": torch.zeros(2), "b": torch.zeros(2)})
    folded.fold({"a": t([1.0, 1.0]), "b": t([1.0, 1.0])}, 1)
    with pytest.raises((ValueError, RuntimeError)):
        folded.fold({"a": t([5.0, 5.0]), "b": t([1.0, 1.0, 1.0])}, 1)
    assert torch.equal(folded.average()["a"], t([1.0, 1.0]))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def _peak_over(action) -> float:
    """MB the process's peak resident memory rose above its resident memory while
    ``action`` ran (the kernel's high-water mark, reset first: no sampling to miss)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak resident memory here")
    before = _status_mb("VmRSS")
    action()
    return _status_mb("VmHWM") - before


def test_folding_and_averaging_a_big_layer_need_no_float64_copy_of_it():
    """A model of one big layer (16 MB of float32): torch's own mixed-dtype ``add_`` and
    ``(sum / total).to(float32)`` each made a float64 temporary of the whole layer (32 MB)
    beside the sum; chunked, the peak is a fraction of that, and the result is the same
    to the bit."""
    fix_mmap_threshold()
    g = torch.Generator().manual_seed(3)
    big = {"w": torch.randn(4_000_000, generator=g), "b": torch.randn(10, generator=g)}
    folded = FoldedSum(big)
    updates = [{k: torch.randn(v.shape, generator=g) for k, v in big.items()} for _ in range(2)]
    assert _peak_over(lambda: folded.fold(updates[0], 3)) < 12  # was 31.6 MB
    folded.fold(updates[1], 5)
    result = {}
    assert _peak_over(lambda: result.update(folded.average())) < 16 + 8  # result + was 46 MB
    expected = {
        k: ((updates[0][k].double() * 3 + updates[1][k].double() * 5) / 8).float() for k in big
    }
    for k in big:
        assert torch.equal(result[k], expected[k])
