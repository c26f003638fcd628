"""`fedmq model export`: each format loads with torch / onnxruntime / safetensors alone and
computes what fedmq's own model computes, and carries the task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from aggregator.checkpoint import RunDir, RunSpec
from broker import zoo
from broker.task import TaskSpec
from fedmq.cli import main

TASKS = {
    "mlp": {"model": {"arch": "mlp", "in_features": 6, "out_features": 3, "hidden": [8]}},
    # cnn1d has BatchNorm: its running statistics are perturbed below, so an export that
    # is not in eval mode (or drops the buffers) gives other outputs
    "cnn1d": {"model": {"arch": "cnn1d", "in_channels": 3, "num_classes": 4, "channels": [8]}},
}
LOCAL = {"tiny": "tests.custom_arch:tiny"}  # a registered architecture, not a built-in


def make_run(path: Path, task_raw: dict, rounds_done: int = 2) -> TaskSpec:
    """A run directory as the aggregator leaves it, without a broker: each round's weights
    are the previous ones perturbed (BatchNorm's running variance kept positive)."""
    task = TaskSpec.from_json(json.dumps(task_raw))
    weights = zoo.build_model(task.model, seed=0, registry=LOCAL).state_dict()
    run = RunDir(path)
    state = run.create(RunSpec("fed", task.to_json(), rounds=5, min_devices=1), weights)
    gen = torch.Generator().manual_seed(1)
    for round_ in range(1, rounds_done + 1):
        weights = {k: perturb(k, v, gen) for k, v in weights.items()}
        run.commit(state, round_, weights, {"round": round_})
    return task


def perturb(name: str, value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if not value.is_floating_point():
        return value + 1  # num_batches_tracked
    noise = torch.randn(value.shape, generator=gen) * 0.3
    return value.abs() + noise.abs() + 0.5 if name.endswith("running_var") else value + noise


def fedmq_outputs(path: Path, round_: int, x: torch.Tensor) -> torch.Tensor:
    """What fedmq's own model (zoo + the checkpoint) computes in eval mode."""
    spec, _, _ = RunDir(path).load()
    model = zoo.build_model(spec.task.model)
    model.load_state_dict(RunDir(path).checkpoint(round_))
    with torch.no_grad():
        return model.eval()(x)


def batch(task: TaskSpec, n: int, time: int = 100) -> torch.Tensor:
    args = task.model.args
    if task.model.arch == "cnn1d":
        return torch.randn(n, args["in_channels"], time)
    return torch.randn(n, args["in_features"])


def export(run_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["model", "export", str(run_dir), *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("arch", sorted(TASKS))
def test_safetensors_holds_the_tensors_and_the_task(tmp_path, arch):
    task = make_run(tmp_path / "run", TASKS[arch])
    out = tmp_path / "m.safetensors"
    code, text = export(tmp_path / "run", "--format", "safetensors", "--out", str(out))
    assert code == 0, text

    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta == {
        "task": task.to_json(),
        "round": "2",
        "arch": arch,
        "format": "fedmq-export/1",
    }
    assert TaskSpec.from_json(meta["task"]) == task
    # a user rebuilds the module from the task's arguments (here: the zoo, which is plain torch)
    model = zoo.build_model(TaskSpec.from_json(meta["task"]).model)
    model.load_state_dict(tensors, strict=True)
    x = batch(task, 5)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fedmq_outputs(tmp_path / "run", 2, x))


@pytest.mark.parametrize("arch", sorted(TASKS))
def test_torchscript_loads_with_torch_alone(tmp_path, arch):
    task = make_run(tmp_path / "run", TASKS[arch])
    out = tmp_path / "m.pt"
    code, text = export(tmp_path / "run", "--format", "torchscript", "--out", str(out))
    assert code == 0, text

    extra = {"task.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["task.json"]) == json.loads(task.to_json())
    assert not loaded.training
    # scripted, not traced: a cnn1d window of another length works too
    for time in (100, 37):
        x = batch(task, 5, time)
        with torch.no_grad():
            got = loaded(x)
        torch.testing.assert_close(got, fedmq_outputs(tmp_path / "run", 2, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", sorted(TASKS))
def test_onnx_runs_in_onnxruntime(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    task = make_run(tmp_path / "run", TASKS[arch])
    out = tmp_path / "m.onnx"
    code, text = export(tmp_path / "run", "--format", "onnx", "--out", str(out))
    assert code == 0, text

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch axis is dynamic (the example input had 2)
        x = batch(task, n)
        (got,) = session.run(["output"], {"input": x.numpy()})
        torch.testing.assert_close(
            torch.from_numpy(got), fedmq_outputs(tmp_path / "run", 2, x), atol=1e-5, rtol=0
        )
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["task"] == task.to_json() and props["round"] == "2"


def test_default_round_is_the_last_completed_and_round_picks_another(tmp_path):
    make_run(tmp_path / "run", TASKS["mlp"], rounds_done=3)
    code, text = export(tmp_path / "run", "--format", "safetensors")
    assert code == 0, text
    default = tmp_path / "run" / "export" / "round-000003.safetensors"
    assert str(default) in text
    assert torch.equal(
        load_file(str(default))["0.weight"], RunDir(tmp_path / "run").checkpoint(3)["0.weight"]
    )

    out = tmp_path / "r0.safetensors"
    code, text = export(
        tmp_path / "run", "--round", "0", "--format", "safetensors", "--out", str(out)
    )
    assert code == 0, text
    assert torch.equal(
        load_file(str(out))["0.weight"], RunDir(tmp_path / "run").checkpoint(0)["0.weight"]
    )
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["round"] == "0"


def test_a_round_without_checkpoint_lists_the_saved_ones(tmp_path):
    make_run(tmp_path / "run", TASKS["mlp"], rounds_done=2)
    code, text = export(tmp_path / "run", "--round", "7", "--format", "safetensors")
    assert code == 1
    assert "no checkpoint for round 7; rounds saved: 0, 1, 2" in text
    assert len(text.strip().splitlines()) == 1


def test_no_run_dir_is_one_line(tmp_path):
    code, text = export(tmp_path / "nothing", "--format", "torchscript")
    assert code == 1
    assert "no run here" in text and len(text.strip().splitlines()) == 1


def test_a_registered_architecture_needs_arch_to_export(tmp_path):
    make_run(tmp_path / "run", {"model": {"arch": "tiny", "in_features": 2}}, rounds_done=0)
    code, text = export(tmp_path / "run", "--format", "torchscript")
    assert code == 1
    assert "unknown architecture 'tiny'" in text and "--arch tiny=" in text
    assert len(text.strip().splitlines()) == 1

    out = tmp_path / "tiny.pt"
    code, text = export(
        tmp_path / "run",
        "--format",
        "torchscript",
        "--out",
        str(out),
        "--arch",
        "tiny=tests.custom_arch:tiny",
    )
    assert code == 0, text
    assert torch.jit.load(str(out))(torch.randn(3, 2)).shape == (3, 1)


def test_onnx_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    make_run(tmp_path / "run", TASKS["mlp"], rounds_done=1)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    code, text = export(tmp_path / "run", "--format", "onnx")
    assert code == 1
    assert "pip install 'fedmq[export]'" in text and "onnxscript" in text
    assert len(text.strip().splitlines()) == 1
