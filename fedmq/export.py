"""A run's global model as a file anyone can load without fedmq.

``export_model(run_dir, fmt, ...)`` reads one round's checkpoint
(``checkpoints/round-NNNNNN.safetensors``; by default the last completed round of
``state.json``) and the task of ``run.json``, and writes:

``safetensors``
    the tensors (a ``state_dict``) with metadata ``task`` (the task's canonical
    JSON), ``round``, ``arch`` and ``format`` = ``fedmq-export/1``: read them
    with ``safetensors.torch.load_file`` and ``safe_open(path, "pt").metadata()``.
``torchscript``
    the model (built from the task, loaded with the weights, in eval mode),
    scripted, with the task's JSON as the extra file ``task.json``:
    ``torch.jit.load(path, _extra_files={"task.json": ""})``.
``onnx``
    the model in eval mode, with a dynamic batch axis; input ``input``, output
    ``output``; the same four metadata keys in the model's ``metadata_props``.
    Needs the ``export`` extra (onnx, onnxscript).

ONNX needs an example input, and so does TorchScript for an architecture that
cannot be scripted (it is then traced). ``linear`` and ``mlp`` take
``(N, in_features)``; ``cnn1d`` takes ``(N, in_channels, T)`` and its ONNX file is
fixed to the ``T`` given (``time``, 100 by default): only the batch axis is
dynamic. A registered architecture's example input must be given by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aggregator.checkpoint import RunDir
from broker import zoo
from broker.errors import ConfigError, FedmqError, TaskError
from broker.task import TaskSpec

FORMAT = "fedmq-export/1"
FORMATS = ("safetensors", "torchscript", "onnx")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
DEFAULT_TIME = 100  # cnn1d's example window length T, which an ONNX file is fixed to
EXTRA = "pip install 'fedmq[export]'"


@dataclass(frozen=True)
class RoundModel:
    """One round's global model of a run, with the task it was trained for."""

    task: TaskSpec
    round: int
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    round: int
    arch: str


def read_round(run_dir: Path, round_: int | None = None) -> RoundModel:
    """The global model after ``round_`` (default: the last completed round) and the task.

    Read-only (``RunDir.load`` would trim metrics), so a running aggregator's directory is safe.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run_dir}: no run here (no run.json)")
    try:
        spec_raw = json.loads(run.run_json.read_text())
        task = TaskSpec.from_json(spec_raw["task_json"])
        if round_ is None:
            round_ = int(json.loads(run.state_json.read_text())["completed_round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedmqError(f"{run_dir}: cannot read the run: {exc}") from None
    if not run.checkpoint_path(round_).exists():
        have = checkpoint_rounds(run)
        listed = ", ".join(str(r) for r in have) if have else "none"
        raise ConfigError(f"{run_dir}: no checkpoint for round {round_}; rounds saved: {listed}")
    return RoundModel(task=task, round=round_, tensors=run.checkpoint(round_))


def checkpoint_rounds(run: RunDir) -> list[int]:
    rounds = []
    for path in (run.path / "checkpoints").glob("round-*.safetensors"):
        digits = path.stem.removeprefix("round-")
        if digits.isdigit():
            rounds.append(int(digits))
    return sorted(rounds)


def build_module(
    task: TaskSpec, tensors: dict[str, torch.Tensor], registry: zoo.Registry | None = None
) -> nn.Module:
    """The task's model with ``tensors`` loaded, in eval mode (BatchNorm uses its running stats)."""
    try:
        model = zoo.build_model(task.model, registry=registry)
    except TaskError as exc:
        if getattr(exc, "reason", "") != "unknown_architecture":
            raise
        raise TaskError(
            f"{exc}; export on a machine that has it, with --arch {task.model.arch}="
            "package.module:function"
        ) from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TaskError(f"the checkpoint does not fit model {task.model.arch!r}: {first}") from None
    return model.eval()


def example_input(task: TaskSpec, batch: int = 2, time: int = DEFAULT_TIME) -> torch.Tensor:
    """A random batch shaped as the task's architecture takes it (see device_agent.data)."""
    args = task.model.args
    if task.model.arch in ("linear", "mlp"):
        return torch.randn(batch, int(args["in_features"]))
    if task.model.arch == "cnn1d":
        return torch.randn(batch, int(args["in_channels"]), time)
    raise TaskError(
        f"no example input for architecture {task.model.arch!r} (only for linear, mlp, cnn1d); "
        "export it as safetensors"
    )


def export_model(
    run_dir: Path,
    fmt: str,
    out: Path | None = None,
    round_: int | None = None,
    registry: zoo.Registry | None = None,
    time: int = DEFAULT_TIME,
) -> Exported:
    """Write the run's global model after ``round_`` as ``fmt``; default file
    ``RUN_DIR/export/round-NNNNNN.<ext>``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    chosen = read_round(Path(run_dir), round_)
    path = Path(out) if out else Path(run_dir) / "export" / f"round-{chosen.round:06d}{SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    task_json = chosen.task.to_json()
    if fmt == "safetensors":
        write_safetensors(path, chosen, task_json)
    else:
        model = build_module(chosen.task, chosen.tensors, registry)
        if fmt == "torchscript":
            write_torchscript(path, model, chosen.task, task_json, time)
        else:
            example = example_input(chosen.task, time=time)
            write_onnx(path, model, example, metadata(chosen, task_json))
    return Exported(path=path, format=fmt, round=chosen.round, arch=chosen.task.model.arch)


def metadata(chosen: RoundModel, task_json: str) -> dict[str, str]:
    return {
        "task": task_json,
        "round": str(chosen.round),
        "arch": chosen.task.model.arch,
        "format": FORMAT,
    }


def write_safetensors(path: Path, chosen: RoundModel, task_json: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in chosen.tensors.items()}
    save_file(tensors, str(path), metadata=metadata(chosen, task_json))


def write_torchscript(
    path: Path, model: nn.Module, task: TaskSpec, task_json: str, time: int
) -> None:
    """Scripted (any input length); traced on an example input if the model cannot be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer torch deprecates torch.jit
        try:
            compiled = torch.jit.script(model)
        except Exception:  # a registered architecture that torch.jit cannot script
            with torch.no_grad():
                compiled = torch.jit.trace(model, example_input(task, time=time))
        torch.jit.save(compiled, str(path), _extra_files={"task.json": task_json})


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs {exc.name}: {EXTRA}") from None


def write_onnx(path: Path, model: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> None:
    """torch.onnx's exporter (torch.export based), batch axis dynamic; ``meta`` (the task...)
    as the model's metadata_props."""
    import onnx

    try:
        with quiet_exporters(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's deprecation notices, not the user's
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export fails in many ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedmqError(f"ONNX export failed: {first}") from None
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def quiet_exporters():
    """The ONNX exporter logs each optimisation pass and each op library it lacks at INFO or
    WARNING; the user asked for a file, not for that."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
