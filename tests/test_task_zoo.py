"""The task spec (TOML on the aggregator, canonical JSON on the wire) and the model zoo."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from broker import codec, zoo
from broker.errors import ConfigError, TaskError
from broker.task import DataSpec, ModelSpec, TaskSpec, TrainSpec, from_dict
from broker.zoo import build_model

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {  # what a machine's own configuration registers (tests/custom_arch.py)
    "tiny": "tests.custom_arch:tiny",
    "gone": "no_such_module_xyz:build",
    "missing": "tests.custom_arch:missing",
    "constant": "tests.custom_arch:NOT_CALLABLE",
    "not_a_module": "tests.custom_arch:not_a_module",
}

FULL = """
seed = 7

[model]
arch = "cnn1d"
in_channels = 6
num_classes = 7
channels = [8, 16]

[train]
epochs = 2
batch_size = 16
lr = 0.05
optimizer = "adam"
loss = "cross_entropy"
momentum = 0.9

[data]
label = "activity"
"""


def toml(tmp_path: Path, text: str, name: str = "task.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- loading TOML ---------------------------------------------------------------------------


def test_load_the_example_task():
    spec = TaskSpec.load(ROOT / "examples" / "bob_and_alice" / "task.toml")
    assert spec == TaskSpec(
        model=ModelSpec("linear", {"in_features": 2, "out_features": 1}),
        train=TrainSpec(epochs=1, batch_size=0, lr=0.1, optimizer="sgd", loss="mse"),
        data=DataSpec(label="label"),
        seed=0,
    )
    assert not spec.train.is_classification


def test_load_every_field(tmp_path):
    spec = TaskSpec.load(toml(tmp_path, FULL))
    assert spec.seed == 7
    assert spec.model == ModelSpec(
        "cnn1d", {"in_channels": 6, "num_classes": 7, "channels": [8, 16]}
    )
    assert spec.train == TrainSpec(2, 16, 0.05, "adam", "cross_entropy", 0.9)
    assert spec.data.label == "activity"
    assert spec.train.is_classification


def test_defaults(tmp_path):
    spec = TaskSpec.load(toml(tmp_path, '[model]\narch = "linear"\nin_features = 3\n'))
    assert spec.train == TrainSpec() and spec.data == DataSpec() and spec.seed == 0


BAD_TASKS = {
    "unknown section": (
        '[model]\narch = "linear"\n[optim]\nlr = 1\n',
        "unknown task section.*optim",
    ),
    "top-level typo": ('sede = 1\n[model]\narch = "linear"\n', "unknown task section.*sede"),
    "bad optimizer": (
        '[model]\narch = "linear"\n[train]\noptimizer = "rmsprop"\n',
        r"optimizer must be one of \('sgd', 'adam'\), got 'rmsprop'",
    ),
    "bad loss": ('[model]\narch = "linear"\n[train]\nloss = "hinge"\n', "loss must be one of"),
    "lr zero": ('[model]\narch = "linear"\n[train]\nlr = 0\n', "lr must be > 0, got 0"),
    "lr negative": ('[model]\narch = "linear"\n[train]\nlr = -0.1\n', r"lr must be > 0, got -0\.1"),
    "lr not a number": ('[model]\narch = "linear"\n[train]\nlr = "fast"\n', "lr must be a number"),
    "lr nan": ('[model]\narch = "linear"\n[train]\nlr = nan\n', "lr must be a number"),
    "lr inf": ('[model]\narch = "linear"\n[train]\nlr = inf\n', "lr must be a number"),
    "epochs zero": (
        '[model]\narch = "linear"\n[train]\nepochs = 0\n',
        "epochs must be an integer >= 1",
    ),
    "epochs float": (
        '[model]\narch = "linear"\n[train]\nepochs = 1.5\n',
        "epochs must be an integer",
    ),
    "epochs bool": (
        '[model]\narch = "linear"\n[train]\nepochs = true\n',
        "epochs must be an integer",
    ),
    "epochs string": (
        '[model]\narch = "linear"\n[train]\nepochs = "2"\n',
        "epochs must be an integer",
    ),
    "batch_size negative": (
        '[model]\narch = "linear"\n[train]\nbatch_size = -1\n',
        "batch_size must be an integer >= 0",
    ),
    "evaluate not a bool": (
        '[model]\narch = "linear"\n[train]\nevaluate = "no"\n',
        "evaluate must be true or false",
    ),
    "unknown train key": (
        '[model]\narch = "linear"\n[train]\nlearning_rate = 0.1\n',
        r"unknown \[train\] key\(s\): learning_rate",
    ),
    "train not a table": ('train = 3\n[model]\narch = "linear"\n', r"\[train\] must be a table"),
    "missing arch": ("[model]\nin_features = 2\n", r"\[model\] needs arch"),
    "missing model": ("seed = 1\n", r"\[model\] needs arch"),
    "arch not a string": ("[model]\narch = 3\n", r"\[model\] needs arch"),
    "label not a string": ('[model]\narch = "linear"\n[data]\nlabel = 3\n', r"\[data\] must be"),
    "seed not an integer": ('seed = "x"\n[model]\narch = "linear"\n', "seed must be an integer"),
    "invalid TOML": ('[model\narch = "linear"\n', "not valid TOML"),
    "duplicate key": ('[model]\narch = "linear"\narch = "mlp"\n', "not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_TASKS), ids=list(BAD_TASKS))
def test_bad_task_files_are_refused_with_a_clear_message(tmp_path, case):
    text, pattern = BAD_TASKS[case]
    path = toml(tmp_path, text)
    with pytest.raises(TaskError, match=pattern) as info:
        TaskSpec.load(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert info.value.reason == "bad_task"


def test_task_file_not_found(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(TaskError, match="task file not found") as info:
        TaskSpec.load(path)
    assert str(path) in str(info.value)


def test_task_file_not_text(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[model]")
    with pytest.raises(TaskError, match="cannot read task file") as info:
        TaskSpec.load(path)
    assert str(path) in str(info.value)


def test_negative_momentum_is_refused(tmp_path):
    with pytest.raises(TaskError, match="momentum"):
        TaskSpec.load(toml(tmp_path, '[model]\narch = "linear"\n[train]\nmomentum = -1.0\n'))


def test_evaluate_is_on_by_default_and_absent_from_the_json_unless_off(tmp_path):
    plain = TaskSpec.load(toml(tmp_path, '[model]\narch = "linear"\n'))
    assert plain.train.evaluate is True
    assert "evaluate" not in plain.to_json()  # tasks written before it hash the same
    off = TaskSpec.load(toml(tmp_path, '[model]\narch = "linear"\n[train]\nevaluate = false\n'))
    assert off.train.evaluate is False
    assert TaskSpec.from_json(off.to_json()) == off
    assert off.to_json() != plain.to_json()


def test_a_task_that_loads_can_travel_as_json(tmp_path):
    path = toml(tmp_path, '[model]\narch = "linear"\nin_features = 2\nsince = 2024-01-01\n')
    try:
        spec = TaskSpec.load(path)
    except TaskError:
        return  # refusing it at load time is fine too
    TaskSpec.from_json(spec.to_json())


# -- the JSON that travels in the model ----------------------------------------------------


def test_json_round_trip_is_canonical(tmp_path):
    spec = TaskSpec.load(toml(tmp_path, FULL))
    text = spec.to_json()
    assert TaskSpec.from_json(text) == spec
    assert TaskSpec.from_json(text).to_json() == text
    # canonical: sorted keys, no whitespace; the same task always gives the same string
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    shuffled = json.dumps(dict(reversed(list(json.loads(text).items()))), indent=2)
    assert TaskSpec.from_json(shuffled).to_json() == text
    # the same task written in another order gives the same string
    reordered = """
    [data]
    label = "activity"

    [train]
    momentum = 0.9
    loss = "cross_entropy"
    optimizer = "adam"
    lr = 0.05
    batch_size = 16
    epochs = 2

    [model]
    channels = [8, 16]
    num_classes = 7
    in_channels = 6
    arch = "cnn1d"
    """
    assert (
        TaskSpec.load(toml(tmp_path, "seed = 7\n" + textwrap.dedent(reordered), "b.toml")).to_json()
        == text
    )


def test_from_json_accepts_flat_model_arguments():
    flat = '{"model": {"arch": "linear", "in_features": 4}, "train": {"lr": 0.5}}'
    spec = TaskSpec.from_json(flat)
    assert spec.model == ModelSpec("linear", {"in_features": 4}) and spec.train.lr == 0.5


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ('{"model": {"arch": "linear"}, "train": {"lr": 0}}', "lr must be > 0"),
        ('{"model": {"arch": "linear"}, "extra": 1}', "unknown task section"),
        ('{"model": null}', "needs arch"),
    ],
)
def test_from_json_refusals(text, pattern):
    with pytest.raises(TaskError, match=pattern):
        TaskSpec.from_json(text)


def test_from_json_with_non_object_args():
    with pytest.raises(TaskError):
        TaskSpec.from_json('{"model": {"arch": "linear", "args": [1]}}')


# -- the model zoo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "args", "input_shape", "output_shape"),
    [
        ("linear", {"in_features": 3}, (5, 3), (5, 1)),
        ("linear", {"in_features": 3, "out_features": 2}, (5, 3), (5, 2)),
        ("mlp", {"in_features": 4, "out_features": 3}, (5, 4), (5, 3)),
        ("mlp", {"in_features": 4, "out_features": 3, "hidden": [8, 6]}, (5, 4), (5, 3)),
        ("mlp", {"in_features": 4, "out_features": 2, "hidden": []}, (5, 4), (5, 2)),
        ("cnn1d", {"in_channels": 6, "num_classes": 7}, (4, 6, 32), (4, 7)),
        (
            "cnn1d",
            {"in_channels": 3, "num_classes": 2, "channels": [4], "kernel_size": 3},
            (2, 3, 10),
            (2, 2),
        ),
        ("tiny", {"in_features": 5, "out_features": 2}, (3, 5), (3, 2)),
        ("tiny", {}, (3, 2), (3, 1)),
    ],
)
def test_build_model_output_shapes(arch, args, input_shape, output_shape):
    model = build_model(ModelSpec(arch, args), seed=0, registry=LOCAL)
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(*input_shape)).shape == output_shape


def test_model_details():
    assert build_model(ModelSpec("linear", {"in_features": 3, "bias": False})).bias is None
    mlp = build_model(ModelSpec("mlp", {"in_features": 4, "out_features": 3, "hidden": [8, 6]}))
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [8, 6, 3]
    default = build_model(ModelSpec("mlp", {"in_features": 4, "out_features": 3}))
    assert [m.out_features for m in default if isinstance(m, nn.Linear)] == [32, 3]
    cnn = build_model(ModelSpec("cnn1d", {"in_channels": 6, "num_classes": 7}))
    schema = codec.schema_of(cnn.state_dict())
    assert schema["1.num_batches_tracked"] == codec.TensorSpec("I64", ())  # travels as int64


def test_seeded_build_is_reproducible():
    spec = ModelSpec("cnn1d", {"in_channels": 2, "num_classes": 3})
    a, b = build_model(spec, seed=3).state_dict(), build_model(spec, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(spec, seed=4).state_dict()
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_task_to_model_end_to_end(tmp_path):
    spec = TaskSpec.load(toml(tmp_path, FULL))
    model = build_model(TaskSpec.from_json(spec.to_json()).model, seed=spec.seed)
    assert model(torch.randn(2, 6, 20)).shape == (2, 7)


@pytest.mark.parametrize(
    ("arch", "args", "pattern"),
    [
        ("resnet50", {}, "unknown architecture 'resnet50'"),
        ("no_such_module_xyz:build", {}, "unknown architecture 'no_such_module_xyz:build'"),
        ("tests.custom_arch:tiny", {}, "unknown architecture 'tests.custom_arch:tiny'"),
        ("gone", {}, "architecture 'gone': cannot import 'no_such_module_xyz'"),
        ("missing", {}, "has no callable 'missing'"),
        ("constant", {}, "has no callable 'NOT_CALLABLE'"),
        ("not_a_module", {}, "returned int, not a torch.nn.Module"),
        ("linear", {"in_feature": 3}, "bad arguments for model 'linear'"),
        ("linear", {}, "bad arguments for model 'linear'"),
        ("linear", {"in_features": "3"}, "bad arguments for model 'linear'"),
        ("linear", {"in_features": -1}, "cannot build model 'linear'"),
        (
            "mlp",
            {"in_features": 2, "out_features": 2, "hidden": 5},
            "bad arguments for model 'mlp'",
        ),
        ("tiny", {"depth": 3}, "bad arguments"),
    ],
)
def test_build_model_refusals(arch, args, pattern):
    with pytest.raises(TaskError, match=pattern):
        build_model(ModelSpec(arch, args), registry=LOCAL)


def test_task_spec_from_dict_is_the_same_validation():
    with pytest.raises(TaskError, match="lr must be > 0"):
        from_dict({"model": {"arch": "linear"}, "train": {"lr": -1}})


# -- architectures: a lookup, never an import ------------------------------------------------

SENTINEL = "tests.arch_sentinel"


def sentinel_untouched() -> bool:
    return SENTINEL not in sys.modules and "FEDMQ_TEST_ARCH_SENTINEL" not in os.environ


@pytest.mark.parametrize(
    "arch",
    [f"{SENTINEL}:build", SENTINEL, "os:system", "subprocess:run", "tiny:", "../tiny", ""],
)
def test_an_arch_from_a_task_is_never_imported(arch):
    assert sentinel_untouched()
    for local in ({}, {"registry": LOCAL}):
        with pytest.raises(TaskError, match="unknown architecture") as info:
            build_model(ModelSpec(arch, {}), **local)
        assert info.value.reason == "unknown_architecture"
        assert "a task cannot name code to import" in str(info.value)
    assert sentinel_untouched()


def test_the_refusal_lists_what_this_machine_has():
    with pytest.raises(TaskError, match="built in are cnn1d, linear, mlp, none registered"):
        zoo.resolve("resnet")
    with pytest.raises(TaskError, match="registered here extra, tiny"):
        zoo.resolve("resnet", {"tiny": "tests.custom_arch:tiny", "extra": "x.y:z"})


def test_a_registered_name_resolves_to_its_local_target():
    from tests import custom_arch

    assert zoo.resolve("tiny", {"tiny": "tests.custom_arch:tiny"}) is custom_arch.tiny
    assert zoo.resolve("tiny", {"tiny": custom_arch.tiny}) is custom_arch.tiny
    assert zoo.resolve("mlp", {"tiny": custom_arch.tiny}) is zoo.mlp


def test_registries_from_config_and_flags():
    table = {"tiny": "tests.custom_arch:tiny", "net.v2": "a.b_c:make"}
    assert zoo.parse_registry(table, "dev.toml") == table
    assert zoo.parse_registry(None, "dev.toml") == {}
    assert zoo.parse_arch_options(["tiny = tests.custom_arch:tiny"]) == {
        "tiny": "tests.custom_arch:tiny"
    }
    loaded = zoo.load_registry({"tiny": "tests.custom_arch:tiny"}, "test")
    assert loaded["tiny"](in_features=3)(torch.zeros(2, 3)).shape == (2, 1)


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        ("tests.custom_arch:tiny", "must be a table"),
        ({"a:b": "tests.custom_arch:tiny"}, r"name 'a:b' must be letters.*no ':'"),
        ({"": "tests.custom_arch:tiny"}, "name '' must be"),
        ({"mlp": "tests.custom_arch:tiny"}, "'mlp' is a built-in architecture"),
        ({"tiny": "tests.custom_arch"}, 'must be "package.module:function"'),
        ({"tiny": "tests/custom_arch.py:tiny"}, 'must be "package.module:function"'),
        ({"tiny": 3}, 'must be "package.module:function", got 3'),
    ],
)
def test_bad_registrations_name_their_source(entries, pattern):
    with pytest.raises(ConfigError, match=f"dev.toml: .*{pattern}"):
        zoo.parse_registry(entries, "dev.toml: [architectures]")


def test_bad_arch_flags():
    with pytest.raises(ConfigError, match="--arch 'tiny': use NAME=package.module:function"):
        zoo.parse_arch_options(["tiny"])
    with pytest.raises(ConfigError, match="architecture 'gone': cannot import 'nope_xyz'"):
        zoo.load_registry(zoo.parse_arch_options(["gone=nope_xyz:f"]), "registered")
