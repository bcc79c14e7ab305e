"""The procedure of docs/kafka.md ("Adding partitions to impressions and clicks"), run end to
end on a live single-broker Kafka with the join running: records before the change, the
join drained by a heartbeat and stopped, partitions added to both topics (4 -> 8), the
settings changed, the join started again on the same recovery directory, records after the
change (new impressions and clicks, in old and new partitions, and clicks whose impressions
were written before the change). Every expected label comes out exactly once.

The module starts its own broker (free loopback ports, a temporary run directory) and stops
it by PID; the session's stack is not used.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
from confluent_kafka.admin import NewPartitions
from test_speed_features import CTRSTREAM, job_env, make_stream, produce, scrape

from ctrstream import events as E
from ctrstream.config import Settings
from ctrstream.kafka.clients import admin, ensure_topics
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.kafka.topics import Record, read_topic
from ctrstream.stack.manager import Stack, isolated_settings
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port
from ctrstream.streaming.reference import reference_features, reference_labels

BEFORE, AFTER = 4, 8  # partitions of impressions and clicks before and after the change
WINDOW_S = 90.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Settings]:
    """One KRaft broker alone (``stack up --only kafka``), stopped by PID at the end."""
    run_dir = tmp_path_factory.mktemp("stack-partitions")
    (run_dir / "owner.pid").write_text(str(os.getpid()))
    s = isolated_settings(run_dir)
    s = s.model_copy(update={"metrics_port": free_port(), "attribution_window_s": WINDOW_S})
    stack = Stack(s)
    stack.up(only=["kafka"])
    try:
        yield s
    finally:
        stack.down()


def _with_partitions(s: Settings, n: int) -> Settings:
    t = s.topics
    return s.model_copy(
        update={
            "topics": t.model_copy(
                update={
                    "impressions": t.impressions.model_copy(update={"partitions": n}),
                    "clicks": t.clicks.model_copy(update={"partitions": n}),
                }
            )
        }
    )


def _shifted(records, shift_ms: int, tag: str):
    """``records`` with every event ``shift_ms`` later and its ids tagged (another batch of
    traffic); records that do not decode are kept as they are."""
    out = []
    for kind, key, value in records:
        try:
            ev = (E.decode_impression if kind == "impressions" else E.decode_click)(value)
        except Exception:  # noqa: BLE001 - malformed on purpose: keep it
            out.append((kind, key, value))
            continue
        ev = msgspec.structs.replace(
            ev,
            event_time_ms=ev.event_time_ms + shift_ms,
            impression_id=f"{tag}{ev.impression_id}",
            **({"click_id": f"{tag}{ev.click_id}"} if kind == "clicks" else {}),
        )
        out.append((kind, E.key_of(ev), E.encode(ev)))
    return out


def _max_time(records) -> int:
    times = []
    for kind, _, value in records:
        try:
            ev = (E.decode_impression if kind == "impressions" else E.decode_click)(value)
        except Exception:  # noqa: BLE001 - malformed records have no time
            continue
        times.append(ev.event_time_ms)
    return max(times)


def _drained(s: Settings) -> bool:
    """The join holds no impression waiting for clicks (every partition's gauge is 0)."""
    m = scrape(s.metrics_port)
    name = "ctrstream_speed_join_pending_impressions"
    return name in m and m[name] == 0


def _labels(s: Settings) -> tuple[dict[str, tuple], Counter]:
    labels: dict[str, tuple] = {}
    counts: Counter = Counter()
    for rec in read_topic(s, s.topics.labeled.name, isolation="read_committed"):
        lab = E.decode_labeled(rec.value)
        labels[lab.impression.impression_id] = (lab.clicked, lab.click_delay_ms)
        counts[lab.impression.impression_id] += 1
    return labels, counts


def _events(s: Settings) -> dict[str, list[Record]]:
    return {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}


def test_adding_partitions_by_the_documented_procedure(broker, tmp_path):
    s4 = broker
    lateness = int(s4.allowed_lateness_s * 1000)
    window = int(WINDOW_S * 1000)
    rec_dir = tmp_path / "recovery"
    log = tmp_path / "join.log"
    argv = [CTRSTREAM, "speed", "join", "-w", "1", "--recovery-dir", str(rec_dir)]
    argv += ["--snapshot-s", "2"]

    # before the change: a dirty stream through the join on 4 partitions
    before, _ = make_stream(seed=61, n_imps=1200, lateness_ms=lateness)
    produce(s4, before)
    job = start_job(argv, env=job_env(s4), log_path=log)
    try:
        # 2. drain: event time past the last event + window + lateness, pending impressions 0
        drain_at = _max_time(before) + window + lateness + 1000
        send_heartbeat(s4, drain_at)
        expected_before = reference_labels(reference_features(s4, _events(s4)), window)
        wait_until(
            lambda: len(_labels(s4)[0]) >= len(expected_before),
            120,
            what=f"every label of the records before the change ({log})",
        )
        wait_until(lambda: _drained(s4), 30, what=f"the join to drain ({log})")
        stop_job(job)  # SIGTERM
    finally:
        stop_job(job)
    ends = {  # where each partition of the old count ended: the records after it are new
        (kind, r.partition): r.offset for kind, rs in _events(s4).items() for r in rs
    }

    # 3. partitions added to both topics, to the same count
    client = admin(s4)
    ti, tc = s4.topics.impressions.name, s4.topics.clicks.name
    futures = client.create_partitions([NewPartitions(ti, AFTER), NewPartitions(tc, AFTER)])
    for f in futures.values():
        f.result(30)
    wait_until(
        lambda: all(
            len(client.list_topics(t, timeout=10).topics[t].partitions) == AFTER for t in (ti, tc)
        ),
        30,
        what=f"both topics to have {AFTER} partitions",
    )
    # 4. the settings say the new count (until then ensure_topics refuses the topics)
    # its own metrics port: the first job's Bytewax process dies with its launcher a moment
    # after the launcher exits, and may still hold the first port
    s8 = _with_partitions(s4, AFTER).model_copy(update={"metrics_port": free_port()})
    assert ensure_topics(s8, s8.topics.all()) == []

    # 5. the join again, same recovery directory; then the producers. Their events start
    # at the drain heartbeat (anything earlier than it minus the allowed lateness would be
    # late now): new traffic, and clicks on impressions written before the change
    job = start_job(argv, env=job_env(s8), log_path=log)
    try:
        after = _shifted(before, drain_at - _min_time(before), "b-")
        rng = random.Random(7)
        old_imps = [  # impressions labeled before the change
            E.decode_impression(v)
            for k, _, v in before
            if k == "impressions"
            and v
            and v.startswith(b'{"schema_version":1,"imp')
            and E.decode_impression(v).impression_id in expected_before
        ]
        late_clicks = []
        for j, imp in enumerate(rng.sample(old_imps, 60)):
            c = E.Click(
                schema_version=1,
                click_id=f"after-{j}-{imp.impression_id}",
                impression_id=imp.impression_id,
                event_time_ms=drain_at + 10 * j,
                user_id=imp.user_id,
                ad_id=imp.ad_id,
                campaign_id=imp.campaign_id,
                advertiser_id=imp.advertiser_id,
                site_id=imp.site_id,
                ad_category=imp.ad_category,
            )
            late_clicks.append(("clicks", E.key_of(c), E.encode(c)))
        produce(s8, late_clicks + after)
        send_heartbeat(s8, _max_time(after) + window + lateness + 1000)

        events = _events(s8)
        new = {
            k: [r for r in rs if r.offset > ends.get((k, r.partition), -1)]
            for k, rs in events.items()
        }
        moved = {r.partition for r in new["impressions"] if r.partition >= BEFORE}
        assert moved == set(range(BEFORE, AFTER)), moved  # the new partitions are used
        expected_after = reference_labels(reference_features(s8, new), window)
        assert any(c for c, _ in expected_after.values())  # clicked pairs after the change
        expected = {**expected_before, **expected_after}
        assert len(expected) == len(expected_before) + len(expected_after)
        wait_until(
            lambda: len(_labels(s8)[0]) >= len(expected),
            120,
            what=f"every label after the change ({log})",
        )
        assert job.poll() is None, f"the join exited ({log})"
    finally:
        stop_job(job)
    labels, counts = _labels(s8)
    dupes = {k: v for k, v in counts.items() if v > 1}
    assert not dupes, f"{len(dupes)} impressions labeled more than once"
    assert labels == expected
    # nothing written before the change was re-read under the new count
    wrong = [d for d in read_dead_letters(s8) if "wrong partition" in d.reason]
    assert wrong == [], wrong[:3]
    # the clicks on impressions labeled before the change are dead letters, not labels
    after_ids = {E.decode_click(v).impression_id for _, _, v in late_clicks}
    assert all(labels[i] == expected_before[i] for i in after_ids)


def _min_time(records) -> int:
    times = []
    for kind, _, value in records:
        try:
            ev = (E.decode_impression if kind == "impressions" else E.decode_click)(value)
        except Exception:  # noqa: BLE001 - malformed records have no time
            continue
        times.append(ev.event_time_ms)
    return min(times)
