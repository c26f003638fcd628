"""Live progress of an aggregator's rounds in the terminal (rich)."""

from __future__ import annotations

import time

REDRAW_EVERY = 0.2  # seconds between redraws of the round's line on updates


class RoundProgress:
    """A live rich progress bar over rounds, fed by the aggregator's events."""

    def __init__(self, service) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.service = service
        self._drawn = 0.0  # monotonic time of the last redraw
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.task_id = self.progress.add_task(
            "starting",
            total=None if service.config.upstream is not None else service.spec.rounds,
            completed=service.state.completed_round,
        )

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def event(self, kind: str, info: dict) -> None:
        svc = self.service
        if kind == "round_done":
            self.progress.update(self.task_id, completed=info["round"])
            parts = [f"round {info['round']}: {info['devices']} devices"]
            for key, label in (
                ("train_loss", "train loss"),
                ("eval_loss", "eval loss"),
                ("eval_accuracy", "eval acc"),
            ):
                if key in info.get("metrics", {}):
                    parts.append(f"{label} {info['metrics'][key]:.4f}")
            parts.append(f"{info['seconds']:.1f}s")
            self.progress.console.print(", ".join(parts))
        elif kind == "done":
            self.progress.update(self.task_id, description="done")
        elif kind in ("update", "round_open", "device", "control"):
            # counting the online devices walks every device's status: not on every one of
            # 10,000 updates (that was 38 of the aggregator's 66 CPU seconds in a 10,000
            # device run, scripts/bench/simulate.py), but at most 5 times a second
            now = time.monotonic()
            if kind in ("update", "device") and now - self._drawn < REDRAW_EVERY:
                return
            self._drawn = now
            current = svc.current
            accepted = current.accepted if current else 0
            online = sum(1 for s in svc.status.values() if s in ("online", "training"))
            self.progress.update(
                self.task_id,
                description=f"{svc.phase}: {accepted}/{svc.spec.min_devices} updates, "
                f"{online} devices online",
            )
