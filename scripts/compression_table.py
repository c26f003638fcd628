"""The compression table: bytes per update and final accuracy per encoding, on the demo.

    python scripts/compression_table.py               # real `fedmq demo` runs (~1 min each)
    python scripts/compression_table.py --inprocess   # the same rounds in one process

Each row is a run of the smartwatch demo (3 devices by default, 10 rounds) per seed, with
the task's ``[compression]`` table set to the row's encoding; float32 is the plain run,
with no table. Real runs are ``fedmq.demo.run.run_demo``: a secured mosquitto, one
``fedmq agent run`` process per device and the aggregator; bytes per update is the mean
over the rounds of metrics.jsonl's ``update_bytes / devices`` (whole signed payloads:
tensors, safetensors header, metadata and signature). ``--inprocess`` runs
``fedmq/demo/inprocess.py`` with every update encoded, framed with the same metadata
(a signature-sized placeholder), checked by the aggregator's decoder and decoded again,
so its bytes are the same payloads' sizes; there is no broker and no signing.
``--seeds 0,1,2`` repeats every row per seed (the data split, the initial weights and
the training order change with it) and reports the mean.

Accuracy is the final global model's on the held-out test set. Training is seeded and
int8's stochastic rounding too (from the task seed, round and device), so every row is
reproducible; a row's difference from float32 is, per seed, one trajectory against another
(the demo's accuracy moves by 1-2 points from round to round): the table gives the mean
difference over the seeds and the worst one.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

ROWS: dict[str, dict] = {
    "float32": {},
    "fp16": {"encoding": "fp16"},
    "int8": {"encoding": "int8"},
    "int8-channel": {"encoding": "int8", "per_channel": True},
    "topk-0.1": {"encoding": "topk", "fraction": 0.1},
    "topk-0.01": {"encoding": "topk", "fraction": 0.01},
}
SIGNATURE = "A" * 88  # an Ed25519 signature in base64 (broker/signing.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inprocess", action="store_true", help="no broker, one process")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0", metavar="S,T", help="one run per seed per row")
    parser.add_argument("--rows", default=",".join(ROWS), metavar="A,B")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument(
        "--deadline", type=float, default=600, help="real runs: seconds a round waits"
    )
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose among {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    how = "in-process rounds (no broker)" if args.inprocess else "real `fedmq demo` runs"
    print(
        f"# {how}: {args.devices} devices, {args.rounds} rounds, seeds {args.seeds}",
        file=sys.stderr,
    )
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory(prefix="fedmq-compression-") as tmp:
        out = args.out or Path(tmp)
        for seed in seeds:
            for name in rows:
                started = time.monotonic()
                run = run_inprocess if args.inprocess else run_real
                size, accuracy = run(args, seed, out / f"{name}-seed{seed}", ROWS[name])
                results[name].append((size, accuracy, time.monotonic() - started))
                print(
                    f"seed {seed} {name}: {size:,.0f} bytes, accuracy {accuracy:.4f}",
                    file=sys.stderr,
                )
    print(table(results))
    return 0


def run_real(args, seed: int, run_dir: Path, compression: dict) -> tuple[float, float]:
    from fedmq.demo.run import run_demo

    result = run_demo(
        devices=args.devices,
        rounds=args.rounds,
        seed=seed,
        run_dir=run_dir,
        console=Console(stderr=True),
        compression=compression or None,
        centralized=False,
        plain_beside=False,
        deadline=args.deadline,
    )
    return result.bytes_per_update, result.federated_accuracy


def run_inprocess(args, seed: int, run_dir: Path, compression: dict) -> tuple[float, float]:
    from fedmq.demo import inprocess

    sim = inprocess.prepare(run_dir / "data", devices=args.devices, seed=seed)
    wire = Wire(compression, sim.task.seed)
    result = inprocess.run(sim, rounds=args.rounds, transport=wire)
    return sum(wire.sizes) / len(wire.sizes), result.final


class Wire:
    """An update's way from device to aggregator, as the agent and the aggregator take
    it: encoded (topk's residual kept per device), framed, decoded with the model's
    schema and the task's encoding, then decoded to full weights."""

    def __init__(self, table: dict, task_seed: int) -> None:
        from broker.compression_settings import parse

        self.settings = parse(table)
        self.task_seed = task_seed
        self.residuals: dict[str, torch.Tensor] = {}
        self.sizes: list[int] = []

    def __call__(self, device: str, round_: int, base: dict, trained: dict) -> dict:
        from broker import codec, compression, messages
        from device_agent.trainer import training_seed

        meta = messages.update_metadata(
            round_=round_,
            device_id=device,
            num_samples=1000,
            base_hash="0" * 64,
            metrics={
                "train_loss": 0.123456789,
                "eval_loss": 0.123456789,
                "eval_accuracy": 0.123456789,
                "train_seconds": 1.23456789,
            },
            federation="demo",
            run_id="0" * 16,
            encoding=self.settings.label,
        )
        meta["signature"] = SIGNATURE
        tensors = trained
        if self.settings.active:
            seed = training_seed(self.task_seed, round_, device) ^ 0x5EED
            tensors, residual = compression.encode(
                trained,
                base,
                self.settings,
                generator=torch.Generator().manual_seed(seed),
                residual=self.residuals.get(device),
            )
            if residual is not None:
                self.residuals[device] = residual
        payload = codec.encode(tensors, meta)
        self.sizes.append(len(payload))
        update = messages.decode_update(
            payload, schema=codec.schema_of(base), compression=self.settings
        )
        if not self.settings.active:
            return update.tensors
        weights = compression.decode(update.tensors, self.settings, base)
        compression.finite(weights)
        return weights


def table(results: dict[str, list[tuple[float, float, float]]]) -> str:
    """Markdown: per row, mean bytes, mean accuracy, and its difference from float32's
    run of the same seed (mean, worst)."""
    plain = results.get("float32")
    lines = [
        "| encoding | bytes per update | x float32 | final accuracy | vs float32 (mean, worst) "
        "| seconds per run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_size = mean([r[0] for r in plain]) if plain else math.nan
    for name, runs in results.items():
        size, accuracy = mean([r[0] for r in runs]), mean([r[1] for r in runs])
        diffs = [100 * (r[1] - p[1]) for r, p in zip(runs, plain)] if plain else [math.nan]
        lines.append(
            f"| {name} | {size:,.0f} | {size / base_size:.3f} | {100 * accuracy:.1f}% "
            f"| {mean(diffs):+.1f} pts, {min(diffs):+.1f} | {mean([r[2] for r in runs]):.0f} |"
        )
    return "\n".join(lines)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    sys.exit(main())
