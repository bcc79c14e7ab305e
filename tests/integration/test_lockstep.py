"""The lockstep replay against a real Kafka: a step's clicks are sent only once the scorer has
handled the step's impressions, and a scorer that does not keep up stops it with a clear
error."""

from __future__ import annotations

import threading

import pytest

from ctrstream.kafka.clients import topic_end_offsets
from ctrstream.simulation.lockstep import LockstepError, replay_lockstep

STEP_MS = 10_000
T0 = 1_750_000_000_000


def _records() -> list[tuple[str, bytes, bytes, int]]:
    """Two steps of event time: 3 impressions and 2 clicks in the first, 2 and 1 in the second."""
    out = []
    for step in range(2):
        base = T0 + step * STEP_MS
        for k in range(3 - step):
            out.append(("impressions", f"i{step}{k}".encode(), b"{}", base + 100 * k))
        for k in range(2 - step):
            out.append(("clicks", f"i{step}{k}".encode(), b"{}", base + 500 + 100 * k))
    return out


def _count(settings, kind: str) -> int:
    topic = getattr(settings.topics, kind).name
    return sum(topic_end_offsets(settings, topic).values())


def test_clicks_of_a_step_wait_for_the_scorer(fresh_topics):
    """A fake scorer that scores whatever impressions Kafka holds, once the test lets it:
    whenever it is asked, the clicks in Kafka are exactly those of the steps already
    scored."""
    s = fresh_topics
    gate, asked = threading.Event(), threading.Event()
    seen: list[tuple[int, int]] = []  # (impressions, clicks) in Kafka when the scorer is asked

    def scorer_count() -> int:
        n_imps, n_clicks = _count(s, "impressions"), _count(s, "clicks")
        seen.append((n_imps, n_clicks))
        asked.set()
        return n_imps if gate.is_set() else 0

    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(
            summary=replay_lockstep(
                s, _records(), STEP_MS, scorer_count, base=0, progress=False, poll_s=0.02
            )
        )
    )
    t.start()
    try:
        assert asked.wait(30)
        # the first step's impressions are in Kafka, its clicks are held back
        assert _count(s, "impressions") == 3 and _count(s, "clicks") == 0
    finally:
        gate.set()  # the scorer catches up
        t.join(60)
    assert not t.is_alive() and "summary" in result
    # asked while step 1 was being scored: 3 impressions, no click; while step 2 was: 5
    # impressions and step 1's 2 clicks - never a click of a step not yet scored
    assert set(seen) <= {(3, 0), (5, 2)} and (3, 0) in seen and (5, 2) in seen, seen
    summary = result["summary"]
    assert summary.by_topic == {"impressions": 5, "clicks": 3} and summary.steps == 2
    assert _count(s, "clicks") == 3


def test_a_scorer_that_does_not_keep_up_stops_the_replay(fresh_topics):
    with pytest.raises(LockstepError, match="did not score the step"):
        replay_lockstep(
            fresh_topics, _records(), STEP_MS, lambda: 0, base=0, progress=False, step_timeout_s=0.5
        )


def test_a_dead_scorer_stops_the_replay_at_once(fresh_topics):
    def dead() -> None:
        raise RuntimeError("the score job exited with code 1")

    with pytest.raises(RuntimeError, match="exited"):
        replay_lockstep(
            fresh_topics,
            _records(),
            STEP_MS,
            lambda: 0,
            base=0,
            check=dead,
            progress=False,
            step_timeout_s=60,
        )
