"""Secure aggregation (SecAgg+) over a real mosquitto: in-process agents and aggregator,
every phase on its MQTT topics, signed, with registry-certified device identities.

- the securely aggregated model equals plain FedAvg's within the quantization error;
- with 30% of the selected devices gone after sharing their keys, the round completes
  and equals FedAvg over the survivors;
- a wiretap reading every topic of the federation finds no payload that correlates
  with any device's true update beyond chance.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aggregator.checkpoint import RunDir
from broker.secagg import wire
from broker.task import TaskSpec
from device_agent.agent import Agent
from fedmq.synthetic import BLOBS_TASK
from tests.helpers import join, mqtt_session, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto
DEVICES = [f"dev{i}" for i in range(10)]
SECURE = "[secure_aggregation]\nclip_range = 2.0\nphase_deadline = 20\n"


def _task(tmp_path, secure: bool, name: str) -> TaskSpec:
    path = tmp_path / f"{name}.toml"
    path.write_text(BLOBS_TASK + ("\n" + SECURE if secure else ""))
    return TaskSpec.load(path)


class DropsAfterSharing(Agent):
    """A device that shares its keys, then goes away before sending its masked input."""

    def _send_masked(self, session) -> None:
        self.dropped_at = session.model.round
        self.stop()


def _run(federation, tmp_path, files, devices, name, secure, rounds=2, dropping=()):
    fed = federation(devices=devices, name=name)
    task = _task(tmp_path, secure, name)
    agg = fed.aggregator(
        tmp_path / name,
        task,
        rounds=rounds,
        min_devices=len(devices) - len(dropping),
        deadline=30,
    )
    thread = fed.in_thread(agg.run, timeout=150)
    agents = []
    for d in devices:
        cls = DropsAfterSharing if d in dropping else Agent
        agent = cls(fed.agent_config(d, files[d], exit_when_done=True))
        agents.append(agent)
        fed.in_thread(agent.run, timeout=150)
    assert join(thread, 170) == 0
    return agg, RunDir(tmp_path / name).metrics(), agents, fed


@pytest.fixture
def files(tmp_path):
    return write_blobs(tmp_path / "data", DEVICES, samples=60)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_secure_model_equals_fedavg_within_quantization(federation, tmp_path, files):
    plain, _, _, _ = _run(federation, tmp_path, files, DEVICES[:5], "plain", secure=False)
    secure, rows, _, _ = _run(federation, tmp_path, files, DEVICES[:5], "secure", secure=True)
    diff = _max_diff(secure.weights, plain.weights)
    print(f"max |secure - fedavg| after 2 rounds: {diff:.2e}")
    assert 0 < diff < 1e-5  # quantized (not identical), yet within its error
    assert [r["secure_aggregation"]["dropped"] for r in rows] == [[], []]
    assert [r["contributors"] for r in rows] == [DEVICES[:5]] * 2
    assert all(r["metrics"]["train_loss"] > 0 for r in rows)


def test_thirty_percent_dropout_after_masking_completes_as_fedavg_over_survivors(
    federation, tmp_path, files
):
    dropping = {"dev2", "dev5", "dev8"}
    survivors = [d for d in DEVICES if d not in dropping]
    secure, rows, agents, _ = _run(
        federation, tmp_path, files, DEVICES, "dropout", secure=True, rounds=1, dropping=dropping
    )
    assert {a.config.device_id for a in agents if getattr(a, "dropped_at", None)} == dropping
    row = rows[0]
    assert row["contributors"] == survivors
    assert sorted(row["secure_aggregation"]["dropped"]) == sorted(dropping)
    plain, _, _, _ = _run(federation, tmp_path, files, survivors, "survivors", False, rounds=1)
    diff = _max_diff(secure.weights, plain.weights)
    print(f"max |secure with 30% dropout - fedavg over the survivors|: {diff:.2e}")
    assert 0 < diff < 1e-5


def test_a_wiretap_on_every_topic_sees_no_device_update(federation, tmp_path, files):
    """Everything published in a secure run, captured by an account that may read the
    whole federation: no payload correlates with any device's true update."""
    devices = DEVICES[:5]
    fed = federation(devices=devices, name="tapped")
    home = fed.home
    home._add_account("wiretap", "operator")
    with open(home.acl_path, "a") as acl:
        acl.write("\nuser wiretap\ntopic read fedmq/tapped/#\n")
    fed.restart_broker()
    captured: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    with mqtt_session(fed.settings("wiretap"), "wiretap") as tap:

        def keep(client, userdata, message) -> None:
            with lock:
                captured.append((message.topic, bytes(message.payload)))

        tap.on_message = keep
        tap.subscribe("fedmq/tapped/#", qos=1)
        task = _task(tmp_path, True, "tapped")
        agg = fed.aggregator(tmp_path / "tapped", task, rounds=1, min_devices=5, deadline=30)
        thread = fed.in_thread(agg.run, timeout=150)
        for d in devices:
            fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=150)
        assert join(thread, 170) == 0
        wait_for(lambda: any("/secagg/" in t for t, _ in captured), 5, "captured messages")
    # the true updates: the same training, in the clear, in a plain run
    plain_fed = federation(devices=devices, name="truth")
    truth = {}
    agg = plain_fed.aggregator(
        tmp_path / "truth", _task(tmp_path, False, "truth"), rounds=1, min_devices=5, deadline=30
    )
    thread = plain_fed.in_thread(agg.run, timeout=150)
    for d in devices:
        agent = plain_fed.agent(d, files[d], exit_when_done=True)
        original = agent._train

        def keep(msg, hooks, d=d, original=original):
            out = original(msg, hooks)
            truth[d] = np.concatenate(
                [
                    (out[0][k].double() - msg.tensors[k].double()).reshape(-1).numpy()
                    for k in sorted(msg.tensors)
                ]
            )
            return out

        agent._train = keep
        plain_fed.in_thread(agent.run, timeout=150)
    assert join(thread, 170) == 0
    assert set(truth) == set(devices)
    kinds = {}
    masked = 0
    for topic, payload in captured:
        kind = topic.split("/")[2]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert "/updates/" not in topic, "a plain update was published in a secure run"
        if kind != "secagg":
            continue
        msg = wire.decode(payload, max_payload=len(payload), length=len(truth["dev0"]) + 1)
        if msg.kind != "masked":
            continue
        masked += 1
        values = msg.tensors["masked"].numpy().view(np.uint32).astype(np.float64)[:-1]
        for d, true in truth.items():
            r = np.corrcoef(values, true)[0, 1]
            assert abs(r) < 5 / np.sqrt(true.size), (topic, d, r)
    print("captured per topic kind:", kinds)
    assert masked == len(devices)
    assert (
        kinds.get("model") and kinds.get("round") and kinds.get("inbox") and kinds.get("receipts")
    )


def test_dp_in_shares_reports_epsilon_and_the_noise_the_survivors_made(federation, tmp_path, files):
    devices = DEVICES[:5]
    fed = federation(devices=devices, name="private")
    path = tmp_path / "private.toml"
    path.write_text(
        BLOBS_TASK + "\n[privacy]\nnoise_multiplier = 0.5\nclip_norm = 1.0\n"
        "\n[secure_aggregation]\nphase_deadline = 20\n"
    )
    agg = fed.aggregator(
        tmp_path / "private", TaskSpec.load(path), rounds=2, min_devices=5, deadline=30
    )
    thread = fed.in_thread(agg.run, timeout=150)
    for d in devices:
        fed.in_thread(fed.agent(d, files[d], exit_when_done=True).run, timeout=150)
    assert join(thread, 170) == 0
    rows = RunDir(tmp_path / "private").metrics()
    from aggregator.privacy import accountant

    for r, row in enumerate(rows, start=1):
        assert row["secure_aggregation"]["noise_multiplier"] == pytest.approx(0.5)
        assert row["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(0.5, 1.0, r, 1e-5))


class SilentAtUnmask(Agent):
    """Sends its masked input, then never answers the unmasking request."""

    def _handle_secure(self, topic, payload):
        if topic == self.topics.round and b'"unmask"' in payload[:2000]:
            return False
        return super()._handle_secure(topic, payload)


def test_fewer_than_t_survivors_answering_fails_the_round_and_unmasks_nothing(
    federation, tmp_path, files
):
    devices = DEVICES[:5]
    fed = federation(devices=devices, name="silent")
    path = tmp_path / "silent.toml"
    path.write_text(BLOBS_TASK + "\n[secure_aggregation]\nphase_deadline = 3\n")
    agg = fed.aggregator(
        tmp_path / "silent",
        TaskSpec.load(path),
        rounds=1,
        min_devices=5,
        deadline=30,
        on_short="stop",
    )
    thread = fed.in_thread(agg.run, timeout=60)
    agents = []
    for d in devices:  # only dev0 answers: every secret lacks shares (threshold 3)
        cls = Agent if d == "dev0" else SilentAtUnmask
        agents.append(cls(fed.agent_config(d, files[d])))
        fed.in_thread(agents[-1].run, timeout=60)
    try:
        with pytest.raises(Exception, match=r"cannot unmask the sum.*nothing was unmasked"):
            join(thread, 60)
    finally:
        for agent in agents:
            agent.stop()
    assert RunDir(tmp_path / "silent").metrics() == []  # no round completed
    assert agg.current.secure.total is not None and agg.current.secure.missing()


def test_sigkill_mid_secure_round_then_resume_starts_the_round_over(federation, tmp_path, files):
    """The aggregator dies after masked inputs of round 2 came in; the resumed one opens
    round 2 with a new session, the devices train again, and the run ends as FedAvg's."""
    from tests.test_faults import completed, sigkill

    devices = DEVICES[:4]
    plain, _, _, _ = _run(federation, tmp_path, files, devices, "plain", secure=False, rounds=3)
    fed = federation(devices=devices, name="killed")
    task = tmp_path / "killed.toml"
    task.write_text(BLOBS_TASK + "\n" + SECURE)
    run_dir, log = tmp_path / "killed-run", tmp_path / "aggregator.log"
    args = ("--task", str(task), "--rounds", "3", "--min-devices", "4", "--deadline", "60")
    args += ("--no-plot",)
    agg = fed.spawn_aggregator(*args, "--run-dir", str(run_dir), log=log)
    sent: list[int] = []
    for d in devices:
        agent = Agent(
            fed.agent_config(d, files[d], exit_when_done=True),
            on_event=lambda kind, info: sent.append(info["round"]) if kind == "trained" else None,
        )
        fed.in_thread(agent.run, timeout=150)
    wait_for(lambda: 2 in sent, 60, "a masked input of round 2", interval=0.005)
    done, _ = sigkill(agg, run_dir)
    assert done == 1, done
    agg = fed.spawn_aggregator("--run-dir", str(run_dir), "--resume", "--no-plot", log=log)
    assert agg.wait(90) == 0, log.read_text()[-3000:]
    assert completed(run_dir) == 3
    rows = RunDir(run_dir).metrics()
    assert [r["contributors"] for r in rows] == [devices] * 3
    assert sent.count(2) > len(devices)  # round 2 was trained again, in its new session
    diff = _max_diff(RunDir(run_dir).checkpoint(3), plain.weights)
    print(f"killed and resumed secure run vs plain FedAvg: {diff:.2e}")
    assert diff < 1e-5
