"""The join dataflow against real Kafka: attribution window edges, duplicates, orphans."""

from __future__ import annotations

from collections import Counter

import pytest
from test_speed_features import BASE, CTRSTREAM, job_env, produce

from ctrstream import events as E
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import start_job, stop_job, wait_until


def imp(i: int, t: int) -> E.Impression:
    return E.Impression(
        schema_version=1,
        impression_id=f"j-imp-{i}",
        event_time_ms=t,
        user_id=i,
        ad_id=i % 3,
        campaign_id=1,
        advertiser_id=1,
        site_id=2,
        ad_category=3,
        device_type="mobile",
        country="FR",
        position=0,
    )


def click(cid: str, im: E.Impression, delay: int, impression_id: str | None = None) -> E.Click:
    return E.Click(
        schema_version=1,
        click_id=cid,
        impression_id=impression_id or im.impression_id,
        event_time_ms=im.event_time_ms + delay,
        user_id=im.user_id,
        ad_id=im.ad_id,
        campaign_id=im.campaign_id,
        advertiser_id=im.advertiser_id,
        site_id=im.site_id,
        ad_category=im.ad_category,
    )


@pytest.fixture
def join_settings(fresh_topics):
    return fresh_topics.model_copy(update={"attribution_window_s": 120.0})


def test_join_window_edges_duplicates_orphans(join_settings, tmp_path):
    s = join_settings
    W = int(s.attribution_window_s * 1000)
    imps = [imp(i, BASE + i * 1000) for i in range(8)]
    clicks = [
        click("c-edge-in", imps[0], W),  # exactly the window: attributed
        click("c-edge-out", imps[1], W + 1),  # 1 ms outside: not attributed, dead letter
        click("c-dup", imps[2], 5000),
        click("c-dup", imps[2], 5000),  # duplicate click
        click("c-second", imps[2], 3000),  # a second click: the earliest delay wins
        click("c-orphan", imps[5], 4000, impression_id="j-imp-ghost"),  # no impression
        click("c-early", imps[4], 10),  # replayed before its impression
    ]
    events = [("impressions", e) for e in imps] + [("impressions", imps[3])]  # duplicate impression
    events += [("clicks", c) for c in clicks]
    events.sort(key=lambda e: e[1].event_time_ms)
    early = next(e for e in events if getattr(e[1], "click_id", "") == "c-early")
    events.remove(early)
    events.insert(events.index(("impressions", imps[4])), early)
    produce(s, [(k, E.key_of(e), E.encode(e)) for k, e in events])
    send_heartbeat(s, BASE + 10 * W)
    job = start_job(
        [CTRSTREAM, "speed", "join", "--no-recovery"],
        env=job_env(s),
        log_path=tmp_path / "join.log",
    )
    try:
        labeled: dict[str, E.Labeled] = {}
        counts: Counter = Counter()

        def all_labeled():
            labeled.clear()
            counts.clear()
            for r in read_topic(s, s.topics.labeled.name):
                lab = E.decode_labeled(r.value)
                assert r.key == lab.impression.impression_id.encode()
                labeled[lab.impression.impression_id] = lab
                counts[lab.impression.impression_id] += 1
            return len(labeled) == len(imps)

        wait_until(
            all_labeled, 90, what=f"labels of every impression (log {tmp_path / 'join.log'})"
        )
        assert set(counts.values()) == {1}  # each impression exactly once (the duplicate too)
        got = {i: (lab.clicked, lab.click_delay_ms) for i, lab in labeled.items()}
        assert got["j-imp-0"] == (1, W)
        assert got["j-imp-1"] == (0, None)
        assert got["j-imp-2"] == (1, 3000)
        assert got["j-imp-3"] == (0, None)
        assert got["j-imp-4"] == (1, 10)
        assert labeled["j-imp-5"].impression == imps[5]
        dead = {}

        def dead_letters():
            dead.clear()
            for d in read_dead_letters(s):
                dead[E.decode_click(d.original).click_id] = d
            return len(dead) >= 2

        wait_until(dead_letters, 30, what="join dead letters")
        assert set(dead) == {"c-edge-out", "c-orphan"}
        assert dead["c-edge-out"].reason.startswith("click after the attribution window")
        assert dead["c-orphan"].reason.startswith("orphan: ")
        assert all(
            d.stage == "join" and d.source_topic == s.topics.clicks.name and d.job == "join"
            for d in dead.values()
        )
    finally:
        stop_job(job)
    assert "Traceback" not in (tmp_path / "join.log").read_text()
