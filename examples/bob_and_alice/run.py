"""The seed tutorial's toy federation, on fedmq and a real mosquitto.

bob holds the points (0,0)->0 and (0,1)->0, alice holds (1,0)->1 and (1,1)->1.
Each round the aggregator publishes nn.Linear(2,1) on the broker, bob's and
alice's agents (real `fedmq agent run` processes) take one full-batch SGD step
on their two points and publish their weights, and the aggregator averages
them. The training loss printed each round falls toward zero; the points never
leave bob.csv and alice.csv.

    python examples/bob_and_alice/run.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from aggregator.service import Aggregator
from broker.task import TaskSpec
from fedmq.local import LocalFederation

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    task = TaskSpec.load(HERE / "task.toml")
    with tempfile.TemporaryDirectory(prefix="bob-and-alice-") as tmp:
        work = Path(tmp)
        with LocalFederation.create(work / "broker", "tutorial", ["bob", "alice"]) as fed:
            print(f"mosquitto on 127.0.0.1:{fed.tls_port} (TLS, passwords, per-device ACL)")
            for device in fed.devices:
                fed.spawn_agent(
                    device, HERE / f"{device}.csv", "--exit-when-done", log=work / f"{device}.log"
                )

            def show(kind: str, info: dict) -> None:
                if kind == "round_done":
                    print(
                        f"round {info['round']:3d}: loss {info['metrics']['train_loss']:.6f} "
                        f"(from {info['devices']} devices)"
                    )

            config = fed.aggregator_config(
                work / "run", task, rounds=args.rounds, min_devices=2, deadline=60, plot=False
            )
            aggregator = Aggregator(config, on_event=show)
            aggregator.run(timeout=300)
            for proc in fed.procs:
                proc.wait(timeout=30)
            weights = {
                k: [round(x, 4) for x in v.flatten().tolist()]
                for k, v in aggregator.weights.items()
            }
            print(f"final weights: {weights}")


if __name__ == "__main__":
    main()
