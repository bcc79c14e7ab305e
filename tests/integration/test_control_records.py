"""Watermark heartbeats that a data producer cannot forge, against real Kafka and Redis.

Forged (another key), unsigned (the old null-value form, with an overflowing time, and a
control header with no signature), replayed (a genuine heartbeat copied later into its own
partition) and copied (into another partition) heartbeats are written, by a plain producer,
into the event topics while the features and join jobs run. Each is rejected, counted and
dead-lettered with its reason; none moves a watermark (no valid event becomes late, every
impression is labeled); the genuine heartbeats still close every window."""

from __future__ import annotations

from collections import Counter

from test_speed_features import BASE, CTRSTREAM, job_env, scrape

from ctrstream import events as E
from ctrstream.kafka import heartbeats as HB
from ctrstream.kafka.clients import make_producer
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port
from ctrstream.store.speed_view import read_speed_view
from ctrstream.streaming.reference import reference_features

DAY = 86_400_000


def _imp(i: int, t: int) -> E.Impression:
    return E.Impression(
        schema_version=1,
        impression_id=f"hb-imp-{i}",
        event_time_ms=t,
        user_id=i % 7,
        ad_id=i % 5,
        campaign_id=1,
        advertiser_id=1,
        site_id=i % 3,
        ad_category=2,
        device_type="desktop",
        country="NL",
        position=0,
    )


def _click(im: E.Impression) -> E.Click:
    return E.Click(
        schema_version=1,
        click_id=f"clk-{im.impression_id}",
        impression_id=im.impression_id,
        event_time_ms=im.event_time_ms + 2_000,
        user_id=im.user_id,
        ad_id=im.ad_id,
        campaign_id=im.campaign_id,
        advertiser_id=im.advertiser_id,
        site_id=im.site_id,
        ad_category=im.ad_category,
    )


def _events(imps: list[E.Impression]) -> list[tuple[str, E.Impression | E.Click]]:
    out: list[tuple[str, E.Impression | E.Click]] = []
    for k, im in enumerate(imps):
        out.append(("impressions", im))
        if k % 4 == 0:
            out.append(("clicks", _click(im)))
    out.sort(key=lambda e: e[1].event_time_ms)
    return out


def _control_count(metrics: dict[str, float], flow: str, outcome: str) -> float:
    """ctrstream_speed_control_records_total of ``flow`` and ``outcome``, over both topics."""
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("ctrstream_speed_control_records_total{")
        and f'flow="{flow}"' in k
        and f'outcome="{outcome}"' in k
    )


def test_forged_unsigned_and_replayed_heartbeats_are_rejected_and_counted(
    fresh_topics, tmp_path, r
):
    s = fresh_topics.model_copy(update={"metrics_port": free_port()})
    s_join = s.model_copy(update={"metrics_port": free_port(), "attribution_window_s": 60.0})
    r.select(0)
    r.flushdb()
    secret = HB.load_control_secret(s)  # the stack's own key, made by `stack up`
    ti, tc = s.topics.impressions.name, s.topics.clicks.name
    n_parts = s.topics.impressions.partitions
    imps = [_imp(i, BASE + i * 1_000) for i in range(400)]
    first, second = _events(imps[:200]), _events(imps[200:])
    t_far = imps[-1].event_time_ms + 30 * DAY  # would make every later event late
    p = make_producer(s)

    def send(topic, part, key, value, headers=None):
        where = {} if part is None else {"partition": part}  # None: the key's partition
        p.produce(topic, key=key, value=value, headers=headers, **where)

    expected: Counter = Counter()
    # 1. before any event, in every partition of both topics: a heartbeat signed with
    #    another key, the old unsigned null-value forms (one overflowing int64) and a
    #    control header without a signature
    other = bytes(range(32))
    for topic in (ti, tc):
        for part in range(n_parts):
            key, value, headers = HB.heartbeat_record(other, topic, part, t_far)
            send(topic, part, key, value, headers)
            send(topic, part, b"__ctrstream_watermark__:" + str(t_far).encode(), None)
            send(topic, part, b"__ctrstream_watermark__:99999999999999999999", None)
            send(topic, part, b"x", b'{"event_time_ms":1}', [(HB.CONTROL_HEADER, b"watermark")])
            expected["forged"] += 1
            expected["unsigned"] += 3
    for kind, ev in first:
        send(getattr(s.topics, kind).name, None, E.key_of(ev), E.encode(ev))
    # 2. a genuine heartbeat in impressions[0] just after the first half, then two copies of
    #    it: later in the same partition (replayed) and in impressions[1] (forged)
    t_half = imps[199].event_time_ms + 1
    genuine = HB.heartbeat_record(secret, ti, 0, t_half)
    send(ti, 0, *genuine)
    expected["accepted"] += 1
    for kind, ev in second[:20]:
        send(getattr(s.topics, kind).name, None, E.key_of(ev), E.encode(ev))
    p.flush(30)
    send(ti, 0, *genuine)
    send(ti, 1, *genuine)
    expected["replayed"] += 1
    expected["forged"] += 1
    for kind, ev in second[20:]:
        send(getattr(s.topics, kind).name, None, E.key_of(ev), E.encode(ev))
    assert p.flush(30) == 0
    HB.send_heartbeat(s, imps[-1].event_time_ms + 2 * 3_600_000)  # closes every window
    expected["accepted"] += 2 * n_parts

    recs = {kind: read_topic(s, getattr(s.topics, kind).name) for kind in ("impressions", "clicks")}
    ref = reference_features(s, recs)
    control = {o: ref.stats[f"control_{o}"] for o in ("forged", "unsigned", "replayed")}
    assert control == {o: expected[o] for o in control}
    assert ref.stats["heartbeats"] == expected["accepted"]
    assert ref.stats["late"] == 0  # no forged time moved a watermark
    assert ref.stats["counted_i"] == len(imps)

    features = start_job(
        [CTRSTREAM, "speed", "features", "--no-recovery"],
        env=job_env(s),
        log_path=tmp_path / "features.log",
    )
    join = start_job(
        [CTRSTREAM, "speed", "join", "--no-recovery"],
        env=job_env(s_join),
        log_path=tmp_path / "join.log",
    )
    try:
        wait_until(
            lambda: read_speed_view(r) == ref.cells,
            120,
            what=f"the speed view to equal the reference (log {tmp_path / 'features.log'})",
        )
        dead: dict = {}

        def all_dead() -> bool:
            dead.clear()
            for d in read_dead_letters(s):
                dead[(d.source_topic, d.partition, d.offset)] = d
            return len(dead) >= len(ref.dead)

        wait_until(all_dead, 60, what="every rejected control record in the dead letters")
        assert set(dead) == set(ref.dead)
        for where, (stage, outcome) in ref.dead.items():
            assert (dead[where].stage, stage) == ("control", "control")
            assert dead[where].reason.startswith(f"{outcome} control record"), dead[where]
        m = scrape(s.metrics_port)
        for outcome, n in expected.items():
            assert _control_count(m, "features", outcome) == n, outcome
        assert m["ctrstream_speed_late_total"] == 0
        # the join: every impression labeled once (a forged time would have made the second
        # half late, and dropped it), the rejected records counted the same way
        labels: Counter = Counter()

        def all_labeled() -> bool:
            labels.clear()
            for rec in read_topic(s, s.topics.labeled.name):
                labels[E.decode_labeled(rec.value).impression.impression_id] += 1
            return len(labels) == len(imps)

        wait_until(all_labeled, 90, what=f"every label (log {tmp_path / 'join.log'})")
        assert set(labels.values()) == {1}
        mj = scrape(s_join.metrics_port)
        for outcome, n in expected.items():
            assert _control_count(mj, "join", outcome) == n, outcome
        assert features.poll() is None and join.poll() is None  # both still running
    finally:
        stop_job(features)
        stop_job(join)
    for name in ("features.log", "join.log"):
        assert "Traceback" not in (tmp_path / name).read_text()
