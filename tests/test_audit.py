"""The audit that counts lost and double-counted updates (fedmq/audit.py), on hand-made
records: each anomaly it exists to find is found, so a "lost 0" from it means something."""

from __future__ import annotations

from fedmq.audit import Claim, audit, claims_in_log, late_in_log

AGENT_LOG = """\
11:21:37 INFO fedmq.cli: device dev1 on 127.0.0.1:42987, federation chaos, data dev1.csv
11:21:38 INFO fedmq.agent: round 1: trained on 400 samples, loss 0.2177, published 1212 bytes
11:21:39 INFO fedmq.agent: round 2: model seen again, re-sent the update
11:21:39 INFO fedmq.agent: round 2: trained on 400 samples, loss 0.1857, published 1220 bytes
"""


def rows(*contributors: list[str]) -> list[dict]:
    return [
        {"round": r, "devices": len(c), "samples": 10 * len(c), "contributors": c}
        for r, c in enumerate(contributors, start=1)
    ]


def claims(*keys: tuple[int, str]) -> list[Claim]:
    return [Claim(r, d, 10) for r, d in keys]


def device_rows(*keys: tuple[int, str]) -> list[dict]:
    return [{"round": r, "device": d, "num_samples": 10, "metrics": {}} for r, d in keys]


def test_parses_what_an_agent_says_it_published():
    assert claims_in_log("dev1", AGENT_LOG) == [Claim(1, "dev1", 400), Claim(2, "dev1", 400)]
    line = "x INFO fedmq.aggregator: round 3: late update from dev2 (trained for round 2)\n"
    assert late_in_log(line) == [(2, "dev2")]


def test_a_clean_run_has_nothing_to_report():
    result = audit(claims((1, "a"), (1, "b"), (2, "a"), (2, "b")), rows(["a", "b"], ["a", "b"]))
    assert result.ok and len(result.aggregated) == 4
    assert result.summary().endswith("lost 0; double-counted 0; unclaimed 0")


def test_an_update_published_but_not_aggregated_is_lost():
    result = audit(claims((1, "a"), (1, "b")), rows(["a"]), device_rows((1, "a")))
    assert result.lost == [(1, "b")] and not result.ok


def test_late_only_for_the_very_update_the_aggregator_called_late():
    published = claims((1, "a"), (1, "b"), (2, "a"), (2, "b"))
    closed_without_b = rows(["a"], ["a", "b"])
    assert audit(published, closed_without_b, late=[(1, "b")]).late == [(1, "b")]
    assert audit(published, closed_without_b, late=[(1, "b")]).ok
    assert audit(published, closed_without_b, late=[(2, "b")]).lost == [(1, "b")]  # other round
    assert audit(published, closed_without_b, late=[(1, "a")]).lost == [(1, "b")]  # other device


def test_a_late_copy_of_an_aggregated_update_accounts_for_nothing():
    """A re-send after a restart arrives late for an update already aggregated: it must
    not hide a loss of the same device in another round (chaos seed 0 found this)."""
    published = claims((1, "a"), (1, "b"), (2, "a"), (2, "b"))
    result = audit(published, rows(["a", "b"], ["a"]), late=[(1, "b")])
    assert result.lost == [(2, "b")] and result.late == []


def test_an_update_still_queued_after_the_run_is_late_for_its_own_round_only():
    published = claims((1, "a"), (1, "b"), (2, "a"), (2, "b"))
    result = audit(published, rows(["a"], ["a"]), unprocessed=[(2, "b")])
    assert (result.late, result.lost) == ([(2, "b")], [(1, "b")])


def test_one_late_update_accounts_for_one_claim():
    published = claims((1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b"))
    result = audit(published, rows(["a"], ["a"], ["a", "b"]), late=[(2, "b")])
    assert (result.late, result.lost) == ([(2, "b")], [(1, "b")])


def test_only_the_last_update_of_a_killed_agent_may_have_died_with_it():
    published = claims((1, "a"), (1, "b"), (2, "a"), (2, "b"))
    result = audit(published, rows(["a"], ["a"]), died=[Claim(2, "b", 10)])
    assert result.died == [(2, "b")] and result.lost == [(1, "b")]


def test_a_device_counted_twice_in_a_round_is_double_counted():
    published = claims((1, "a"), (1, "b"))
    assert audit(published, rows(["a", "b", "b"])).double == [(1, "b")]
    counted = [{**rows(["a", "b"])[0], "devices": 3}]
    assert audit(published, counted).double == [(1, "?")]
    twice = device_rows((1, "a"), (1, "b"), (1, "b"))
    assert audit(published, rows(["a", "b"]), twice).double == [(1, "b")]


def test_an_aggregated_update_no_agent_published_is_unclaimed():
    assert audit(claims((1, "a")), rows(["a", "b"])).unclaimed == [(1, "b")]
    wrong_samples = [{"round": 1, "device": "a", "num_samples": 11, "metrics": {}}]
    assert audit(claims((1, "a")), rows(["a"]), wrong_samples).unclaimed == [(1, "a")]


def test_rounds_the_run_did_not_complete_are_not_judged():
    result = audit(claims((1, "a"), (2, "a")), rows(["a"]))
    assert result.published == [(1, "a")] and result.ok
