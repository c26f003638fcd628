"""The peer benchmark's Flower side: the workload in Flower 1.42's simulation.

    <flower venv>/bin/python scripts/bench/flower_app.py DATA_DIR --rounds 20 --events FILE

Run by peer.py with the python of Flower's own venv (flwr[simulation]==1.42.0 and CPU
torch; numpy and torch are all it needs of ``workload``). Flower's Message API: a
``ClientApp`` whose ``train`` trains one local epoch as ``workload.train_local`` does (the
same shuffles, seeded by round and client), a ``ServerApp`` running
``flwr.serverapp.strategy.FedAvg`` (every client every round: fraction_train 1.0, min
train and available nodes = the clients; no client-side evaluation round, fraction_evaluate
0.0: the global model is scored on the test split by ``evaluate_fn``, which also marks each
round's end in ``--events``), all run by ``flwr.simulation.run_simulation`` on its default
Ray backend, one CPU per client actor (so one actor per core). Prints the final accuracy as
JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Ray's workers import ``workload`` by name when they unpickle the ClientApp
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
)

import torch  # noqa: E402
import workload  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

DATA_ENV, ROUNDS_ENV, EVENTS_ENV = "PEER_DATA", "PEER_ROUNDS", "PEER_EVENTS"
_clients: list = []

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    if not _clients:
        _clients.extend(workload.load_clients(Path(os.environ[DATA_ENV])))
    name, X, y = _clients[int(context.node_config["partition-id"])]
    round_ = int(msg.content["config"]["server-round"])
    model = workload.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = workload.train_local(model, X, y, workload.training_seed(workload.SEED, round_, name))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(X)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@server_app.main()
def main_server(grid: Grid, context: Context) -> None:
    data, events = Path(os.environ[DATA_ENV]), Path(os.environ[EVENTS_ENV])
    clients = len(json.loads((data / "workload.json").read_text())["clients"])
    X_test, y_test = workload.load_test(data)
    model = workload.build_model()

    def evaluate(round_: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy = workload.accuracy(model, X_test, y_test)
        if round_ > 0:
            workload.round_event(events, round_, accuracy)
        return MetricRecord({"accuracy": accuracy})

    init = {k: torch.from_numpy(v) for k, v in workload.load_init(data).items()}
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(init),
        num_rounds=int(os.environ[ROUNDS_ENV]),
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--events", type=Path, required=True)
    args = parser.parse_args()
    os.environ[DATA_ENV] = str(args.data.resolve())
    os.environ[ROUNDS_ENV] = str(args.rounds)
    os.environ[EVENTS_ENV] = str(args.events.resolve())
    torch.set_num_threads(1)
    clients = len(json.loads((args.data / "workload.json").read_text())["clients"])
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rows = [json.loads(line) for line in args.events.read_text().splitlines()]
    if len(rows) != args.rounds:
        raise SystemExit(f"flower: {len(rows)} of {args.rounds} rounds finished")
    print(json.dumps({"accuracy": rows[-1]["accuracy"], "time": time.time()}))


if __name__ == "__main__":
    main()
