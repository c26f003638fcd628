"""The peer benchmark's in-process loop: plain PyTorch FedAvg, no framework, one process.

    python scripts/bench/inprocess_loop.py DATA_DIR --rounds 20 --events FILE

Each round every client trains the global model for one local epoch (``workload``'s
``train_local``), the updates are averaged by samples, and the global model is scored on
the test split. A line per round goes to ``--events``; the result is JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--events", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)  # as fedmq's agents and aggregator (--threads 1)
    clients = workload.load_clients(args.data)
    X_test, y_test = workload.load_test(args.data)
    weights = workload.load_init(args.data)
    model = workload.build_model()
    accuracy = 0.0
    for round_ in range(1, args.rounds + 1):
        updates = []
        for name, X, y in clients:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
            workload.train_local(model, X, y, workload.training_seed(workload.SEED, round_, name))
            updates.append(({k: v.numpy().copy() for k, v in model.state_dict().items()}, len(X)))
        weights = workload.fedavg(updates)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        accuracy = workload.accuracy(model, X_test, y_test)
        workload.round_event(args.events, round_, accuracy)
    print(json.dumps({"accuracy": accuracy, "time": time.time()}))


if __name__ == "__main__":
    main()
